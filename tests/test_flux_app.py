"""The app on FLUX.1-dev: ``--model`` pointing at a tiny random FLUX folder (tests/tiny_flow.py).

As tests/test_sd3_app.py: through the public API (gradio_client) generate, rate, compare, a round
with RLR and one with DDPO (trained on the reverse SDE, with the embedded guidance), each new
version's samples in the rating queue; a version's exported LoRA loads into a fresh plain
FluxPipeline and gives the app's images (the ODE) for the same seed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from tests.test_real_model import PROMPT, TINY_ROUND, call, png, wait_round
from tests.tiny_flow import save_tiny_flux

gradio_client = pytest.importorskip("gradio_client")
# The FLUX defaults train with LoRA rank 64 (Flow-GRPO's); the tiny round keeps it small so that the
# test stays quick, and the learning rate large so that the LoRA changes the image. Guidance 3.5 is
# the embedded one (no second model call).
FLUX_ROUND = {**TINY_ROUND, "lora_rank": 4, "guidance": 3.5}
GUIDANCE = 3.5


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def app(flux_folder, tmp_path_factory):
    from app.config import AppConfig
    from app.server import start

    # No backend passed: the app loads --model itself, as `python app.py --model ...` does.
    running = start(AppConfig(model=str(flux_folder), data_dir=tmp_path_factory.mktemp("data"), port=0))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


def test_start_up_names_the_model_and_its_round_defaults(app):
    from app.round_config import DEFAULTS, FAMILY_DEFAULTS

    summary = app.services.model.device_summary()
    assert summary.startswith("tiny-flux on cpu, float32, 16x16"), summary
    assert app.services.round_defaults == {**DEFAULTS, **FAMILY_DEFAULTS["flux"]}


def test_generate_rate_compare(client):
    samples = call(client, "generate", PROMPT, 2, 3, 3, GUIDANCE)
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
    started = call(client, "train_start", {**FLUX_ROUND, "estimator": estimator})
    assert started["settings"]["estimator"] == estimator
    status = wait_round(client)
    assert status["state"] == "finished", status
    versions = {v["version_id"]: v for v in call(client, "versions")}
    (new,) = set(versions) - before
    assert versions[new]["active"] and versions[new]["estimator"] == estimator
    queue = call(client, "samples_to_rate", "carl", 64)
    assert any(s["version_id"] == new for s in queue)  # the new version's samples wait to be rated
    assert call(client, "generate", PROMPT, 1, 3, 3, GUIDANCE)[0]["version_id"] == new
    proxy = json.loads((app.services.rounds.proxy_dir / "reward_proxy.json").read_text())
    assert proxy["image_encoder"]["spec"] == "vae"


def test_exported_lora_loads_in_a_plain_flux_pipeline(client, app, flux_folder, tmp_path):
    from app.generation import GenerationSettings, draw

    trained = [v for v in call(client, "versions") if v["weights_path"]]
    assert trained, "needs the rounds above"
    vid = trained[-1]["version_id"]
    with zipfile.ZipFile(call(client, "export_lora", vid)) as zf:
        zf.extractall(tmp_path / "lora")

    # The lines of docs/own-model.md's FLUX section (the tiny model's native size is 16x16: the
    # pipeline's default would be 128 latent pixels).
    pipe = FluxPipeline.from_pretrained(flux_folder, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path / "lora")
    seed, steps, guidance = 11, 3, GUIDANCE
    plain = pipe([PROMPT] * 2, num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
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
