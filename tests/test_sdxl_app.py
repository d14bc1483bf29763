"""The app on Stable Diffusion XL: ``--model`` pointing at a tiny random SDXL folder (tests/tiny_sdxl.py).

Through the public API (gradio_client), tests/model_app_checks.py's flow: generate, rate, compare, a
round with RLR and one with DDPO, each new version's samples in the rating queue; a version's
exported LoRA loads into a fresh plain StableDiffusionXLPipeline and gives the app's images for the
same seed. A folder of an SDXL pipeline class the app does not serve ends the start with one line
and exit code 2.
"""

from __future__ import annotations

import json

from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from tests.model_app_checks import FamilyApp, ModelAppChecks
from tests.test_real_model import run_main
from tests.tiny_sdxl import save_tiny_sdxl


def ddim(pipe) -> None:
    """The three lines of docs/own-model.md's SDXL section: SDXL ships Euler; the app samples DDIM."""
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


class TestSDXLApp(ModelAppChecks):
    spec = FamilyApp(name="tiny-sdxl", family="stable-diffusion-xl", save=save_tiny_sdxl,
                     pipeline=StableDiffusionXLPipeline, guidance=5.0, plain_kwargs={"eta": 1.0}, prepare=ddim)


def test_an_unserved_sdxl_pipeline_gives_one_line_and_exit_code_2(tmp_path, capsys):
    refiner = tmp_path / "refiner"  # SDXL's refiner: no first text encoder, an img2img pipeline
    refiner.mkdir()
    (refiner / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
        **{c: ["diffusers", "X"] for c in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")}}))
    code, err = run_main(["--model", str(refiner), "--data-dir", str(tmp_path / "data"), "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: --model {refiner}: not a text-to-image pipeline this app can serve")
    assert "serves a StableDiffusionXLPipeline folder" in lines[0]
