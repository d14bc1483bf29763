"""The app on Stable Diffusion XL: ``--model`` pointing at a tiny random SDXL folder (tests/tiny_sdxl.py).

Through the public API (gradio_client): generate, rate, compare, a round with RLR and one with
DDPO, each new version's samples in the rating queue; a version's exported LoRA loads into a fresh
plain StableDiffusionXLPipeline and gives the app's images for the same seed. A folder of an SDXL
pipeline class the app does not serve ends the start with one line and exit code 2.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from tests.test_real_model import PROMPT, TINY_ROUND, call, png, run_main, wait_round
from tests.tiny_sdxl import save_tiny_sdxl

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def app(sdxl_folder, tmp_path_factory):
    from app.config import AppConfig
    from app.server import start

    # No backend passed: the app loads --model itself, as `python app.py --model ...` does.
    running = start(AppConfig(model=str(sdxl_folder), data_dir=tmp_path_factory.mktemp("data"), port=0))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


def test_start_up_names_the_model_and_its_round_defaults(app):
    from app.round_config import DEFAULTS, FAMILY_DEFAULTS

    summary = app.services.model.device_summary()
    assert summary.startswith("tiny-sdxl on cpu, float32, 16x16"), summary
    assert app.services.round_defaults == {**DEFAULTS, **FAMILY_DEFAULTS["stable-diffusion-xl"]}


def test_generate_rate_compare(client):
    samples = call(client, "generate", PROMPT, 2, 3, 3, 5.0)
    assert [s["version"] for s in samples] == ["v0 (base)"] * 2
    assert all(png(s).shape == (16, 16, 3) for s in samples)
    assert not np.array_equal(png(samples[0]), png(samples[1]))
    for s, stars in zip(samples, (2, 4)):
        assert call(client, "rate", s["sample_id"], stars, "ann")["stars"] == stars
    pair = call(client, "next_pair", "bob")
    assert {pair["left"]["sample_id"], pair["right"]["sample_id"]} <= {s["sample_id"] for s in samples}
    out = call(client, "compare", pair["left"]["sample_id"], pair["right"]["sample_id"], "left", "bob")
    assert out["comparison_id"] >= 1


@pytest.mark.parametrize("estimator", ["rlr", "ddpo"])
def test_a_round_trains_a_new_version_whose_samples_reappear(client, app, estimator):
    before = {v["version_id"] for v in call(client, "versions")}
    started = call(client, "train_start", {**TINY_ROUND, "estimator": estimator})
    assert started["settings"]["estimator"] == estimator
    status = wait_round(client)
    assert status["state"] == "finished", status
    versions = {v["version_id"]: v for v in call(client, "versions")}
    (new,) = set(versions) - before
    assert versions[new]["active"] and versions[new]["estimator"] == estimator
    queue = call(client, "samples_to_rate", "carl", 64)
    assert any(s["version_id"] == new for s in queue)  # the new version's samples wait to be rated
    assert call(client, "generate", PROMPT, 1, 3, 3, 5.0)[0]["version_id"] == new
    proxy = json.loads((app.services.rounds.proxy_dir / "reward_proxy.json").read_text())
    assert proxy["image_encoder"]["spec"] == "vae"


def test_exported_lora_loads_in_a_plain_sdxl_pipeline(client, app, sdxl_folder, tmp_path):
    from app.generation import GenerationSettings, draw

    trained = [v for v in call(client, "versions") if v["weights_path"]]
    assert trained, "needs the rounds above"
    vid = trained[-1]["version_id"]
    with zipfile.ZipFile(call(client, "export_lora", vid)) as zf:
        zf.extractall(tmp_path / "lora")

    # The three lines of docs/own-model.md's SDXL section.
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # SDXL ships Euler; the app samples DDIM
    pipe.load_lora_weights(tmp_path / "lora")
    seed, steps, guidance = 11, 3, 5.0
    plain = pipe([PROMPT] * 2, num_inference_steps=steps, guidance_scale=guidance, eta=1.0,
                 generator=torch.Generator().manual_seed(seed), output_type="pt").images

    settings = GenerationSettings(steps=steps, guidance=guidance)
    with app.services.models.lock:
        ours = draw(app.services.models.backend(vid), [PROMPT] * 2, seed, settings)
        base = draw(app.services.models.backend(1), [PROMPT] * 2, seed, settings)
    assert (ours - plain).abs().max() <= 1e-4
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the images: the comparison means something

    call(client, "set_active_version", vid)  # the PNGs the app serves for that seed: the same pixels
    served = call(client, "generate", PROMPT, 2, seed, steps, guidance)
    expected = (plain.permute(0, 2, 3, 1).numpy() * 255).round()
    assert max(np.abs(png(s).astype(float) - e).max() for s, e in zip(served, expected)) <= 1


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
