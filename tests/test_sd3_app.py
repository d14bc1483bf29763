"""The app on Stable Diffusion 3: ``--model`` pointing at a tiny random SD3 folder (tests/tiny_flow.py).

Through the public API (gradio_client), tests/model_app_checks.py's flow: generate, rate, compare, a
round with RLR and one with DDPO (trained on the reverse SDE), each new version's samples in the
rating queue; a version's exported LoRA loads into a fresh plain StableDiffusion3Pipeline and gives
the app's images (the ODE) for the same seed.
"""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from tests.model_app_checks import TINY_ROUND, FamilyApp, ModelAppChecks
from tests.tiny_flow import save_tiny_sd3

# The SD3 defaults train with guidance 4.5 and LoRA rank 32 (Flow-GRPO's); the tiny round keeps them
# small so that the test stays quick, and the learning rate large so that the LoRA changes the image.
SD3_ROUND = {**TINY_ROUND, "lora_rank": 4, "guidance": 1.0}


class TestSD3App(ModelAppChecks):
    spec = FamilyApp(name="tiny-sd3", family="stable-diffusion-3", save=save_tiny_sd3,
                     pipeline=StableDiffusion3Pipeline, guidance=4.5, round=SD3_ROUND)
