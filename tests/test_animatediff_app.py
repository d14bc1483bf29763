"""The app on an AnimateDiff pipeline folder, end to end through its public API (gradio_client):
``--model`` loads the folder as a video model, clips are generated, stored, rated and compared,
an RLR round trains a LoRA on them and makes a version whose clips come back to be rated, and
that version's LoRA exports and loads into a plain diffusers ``AnimateDiffPipeline`` that draws
the app's clip for the same seed. A tiny random pipeline built from configs, smallest settings."""

from __future__ import annotations

import base64
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline

from feedback_store import clips
from tests.test_real_model import call, wait_round
from tests.tiny_animatediff import save_tiny_animatediff

gradio_client = pytest.importorskip("gradio_client")
PROMPT = "a red cat"
TINY_ROUND = {"estimator": "rlr", "steps": 1, "batch_size": 2, "sampling_steps": 3, "max_prompts": 1,
              "samples_per_prompt": 1, "sample_steps": 3, "seed": 0, "learning_rate": 0.05, "block": "auto"}


@pytest.fixture(scope="module")
def ad_folder(tmp_path_factory) -> Path:
    return save_tiny_animatediff(tmp_path_factory.mktemp("models") / "tiny-ad")


@pytest.fixture(scope="module")
def app(ad_folder, tmp_path_factory):
    from app.config import AppConfig
    from app.server import start

    # No backend passed: the app loads --model itself, as `python app.py --model FOLDER` does.
    running = start(AppConfig(model=str(ad_folder), data_dir=tmp_path_factory.mktemp("data"), port=0))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


def frames(sample: dict) -> np.ndarray:
    return clips.read_frames(base64.b64decode(sample["image_png_b64"]))


def test_the_folder_loads_as_a_video_model(app):

    backend = app.services.base_backend
    assert backend.is_video and backend.frames == backend.num_frames
    n = backend.num_frames
    assert app.services.model.device_summary().startswith(f"tiny-ad on cpu, float32, {n} frames of 16x16")


def test_clips_are_generated_stored_rated_and_compared(client, app):
    samples = call(client, "generate", PROMPT, 2, 5, 3, 3.0)
    n = app.services.base_backend.num_frames
    for s in samples:  # one animated PNG per clip with every frame, and its frames' hash
        f = frames(s)
        assert s["frames"] == n and f.shape == (n, 16, 16, 3)
        assert s["settings"]["frames_sha256"] == clips.frames_sha256(clips.frames_of(f))
    assert not np.array_equal(frames(samples[0]), frames(samples[1]))
    left, right = (s["sample_id"] for s in samples)
    assert call(client, "rate", left, 5, "ann")["stars"] == 5
    assert call(client, "rate", right, 1, "ann")["stars"] == 1
    pair = call(client, "next_pair", "bob")
    assert {pair["left"]["sample_id"], pair["right"]["sample_id"]} == {left, right}
    assert call(client, "compare", left, right, "left", "bob", 1.0)["comparison_id"] >= 1


@pytest.mark.slow
def test_an_rlr_round_trains_a_lora_whose_clips_come_back(client, app):
    before = {v["version_id"] for v in call(client, "versions")}
    call(client, "train_start", TINY_ROUND, "")
    status = wait_round(client, timeout=600)
    assert status["state"] == "finished", status
    versions = {v["version_id"]: v for v in call(client, "versions")}
    (new,) = set(versions) - before
    assert versions[new]["active"] and versions[new]["estimator"] == "rlr"
    queue = call(client, "samples_to_rate", "carl", 64)
    assert any(s["version_id"] == new and s["frames"] == app.services.base_backend.num_frames for s in queue)


@pytest.mark.slow
def test_the_exported_lora_draws_the_apps_clip_in_a_plain_pipeline(client, app, ad_folder, tmp_path):
    from app.generation import GenerationSettings, draw

    trained = [v for v in call(client, "versions") if v["weights_path"]]
    assert trained, "needs the round above"
    vid = trained[-1]["version_id"]
    with zipfile.ZipFile(call(client, "export_lora", vid)) as zf:
        zf.extractall(tmp_path / "lora")
    pipe = AnimateDiffPipeline.from_pretrained(ad_folder)
    pipe.load_lora_weights(tmp_path / "lora")
    n, seed, steps, guidance = app.services.base_backend.num_frames, 3, 3, 3.0
    plain = pipe([PROMPT], num_frames=n, num_inference_steps=steps, guidance_scale=guidance, eta=1.0,
                 generator=torch.Generator().manual_seed(seed), output_type="pt").frames
    settings = GenerationSettings(steps=steps, guidance=guidance)
    with app.services.models.lock:
        ours = draw(app.services.models.backend(vid), [PROMPT], seed, settings)
        base = draw(app.services.models.backend(1), [PROMPT], seed, settings)
    assert ours.shape == plain.shape
    assert (ours - plain).abs().max() <= 1e-4
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the clip: the comparison means something
