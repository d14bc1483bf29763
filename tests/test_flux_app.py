"""The app on FLUX.1-dev: ``--model`` pointing at a tiny random FLUX folder (tests/tiny_flow.py).

As tests/test_sd3_app.py, tests/model_app_checks.py's flow through the public API (gradio_client):
generate, rate, compare, a round with RLR and one with DDPO (trained on the reverse SDE, with the
embedded guidance), each new version's samples in the rating queue; a version's exported LoRA loads
into a fresh plain FluxPipeline and gives the app's images (the ODE) for the same seed.
"""

from __future__ import annotations

from diffusers import FluxPipeline

from tests.model_app_checks import TINY_ROUND, FamilyApp, ModelAppChecks
from tests.tiny_flow import save_tiny_flux

# The FLUX defaults train with LoRA rank 64 (Flow-GRPO's); the tiny round keeps it small so that the
# test stays quick, and the learning rate large so that the LoRA changes the image. Guidance 3.5 is
# the embedded one (no second model call).
FLUX_ROUND = {**TINY_ROUND, "lora_rank": 4, "guidance": 3.5}
GUIDANCE = 3.5


class TestFluxApp(ModelAppChecks):
    # docs/own-model.md's FLUX section passes the size: the tiny model's native size is 16x16, the
    # pipeline's default would be 128 latent pixels.
    spec = FamilyApp(name="tiny-flux", family="flux", save=save_tiny_flux, pipeline=FluxPipeline,
                     guidance=GUIDANCE, round=FLUX_ROUND, plain_kwargs={"height": 16, "width": 16})
