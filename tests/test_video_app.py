"""The app on a video model through its API (gradio_client): clips are generated, stored as one
animated PNG each, rated, compared, split into DCoT stages, trained on by an RLR round, and
exported and imported. Smallest settings: 2-3 sampling steps, a 1-step round at batch 2."""

from __future__ import annotations

import base64
import json
import time
import zipfile

import pytest

from feedback_store import FeedbackStore, clips
from feedback_store.videofolder import read_avi
from tests.clip_model import clip_model_dir

gradio_client = pytest.importorskip("gradio_client")
PROMPT = "a large red circle moving fast to the right, black background"
TINY_ROUND = {"estimator": "rlr", "steps": 1, "batch_size": 2, "sampling_steps": 3, "max_prompts": 1,
              "samples_per_prompt": 1, "sample_steps": 2, "block": 1, "seed": 3}


@pytest.fixture(scope="module")
def clip_backend():
    from rlr_core.backends.loading import load_backend

    return load_backend(clip_model_dir())


@pytest.fixture(scope="module")
def clip_app(tmp_path_factory, clip_backend):
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("video-data"), port=0), clip_backend)
    yield app
    app.close()


def test_loading_a_clip_model_folder_gives_a_video_backend(clip_backend):

    assert clip_backend.is_video and clip_backend.frames == 8 and clip_backend.name == "shapesworld-clips"
    assert clip_backend.split_prompt(PROMPT) == (
        "a large shape moving fast to the right, black background",
        "a large circle moving fast to the right, black background", PROMPT)


def wait_for_round(client, timeout: float = 1800) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = client.predict(api_name="/train_status")
        if status["state"] in ("finished", "failed", "stopped"):
            return status
        time.sleep(1.0)
    raise AssertionError("the round did not end in time")


@pytest.mark.slow
def test_a_video_round_through_the_api(clip_app, tmp_path):
    client = gradio_client.Client(clip_app.url, verbose=False)
    store = clip_app.services.store
    samples = client.predict(PROMPT, 2, 7, 2, 1.0, api_name="/generate")
    assert len(samples) == 2
    for s in samples:  # one animated PNG per clip, every frame kept, and its frames' hash
        frames = clips.read_frames(base64.b64decode(s["image_png_b64"]))
        assert s["frames"] == 8 and frames.shape == (8, 32, 32, 3)
        assert s["settings"]["frames_sha256"] == clips.frames_sha256(clips.frames_of(frames))
    left, right = (s["sample_id"] for s in samples)
    client.predict(left, 5, "ann", api_name="/rate")
    client.predict(right, 1, "ann", api_name="/rate")
    pair = client.predict("ann", api_name="/next_pair")
    assert {pair["left"]["sample_id"], pair["right"]["sample_id"]} == {left, right}
    client.predict(left, right, "left", "ann", 1.5, api_name="/compare")
    stages = client.predict(PROMPT, api_name="/split_prompt")
    assert stages["coarse"] == "a large shape moving fast to the right, black background"

    client.predict(TINY_ROUND, "", api_name="/train_start")
    status = wait_for_round(client)
    assert status["state"] == "finished", status
    assert [h["step"] for h in status["history"]] == [1]  # the progress plot's points
    assert status["proxy_comparisons"] == 1 and status["proxy_ratings"] == 2
    versions = client.predict(api_name="/versions")
    assert [v["name"] for v in versions] == ["v0 (base)", "v1 (rlr)"] and versions[1]["active"]

    # the blind before/after pair: the new version's clip and the parent's, from the same noise
    pair = client.predict("ann", api_name="/next_pair")
    assert {pair["left"]["version"], pair["right"]["version"]} == {"v0 (base)", "v1 (rlr)"}
    assert pair["left"]["frames"] == pair["right"]["frames"] == 8
    client.predict(pair["left"]["sample_id"], pair["right"]["sample_id"], "right", "ann", api_name="/compare")
    assert client.predict(api_name="/versions")[1]["comparisons_vs_parent"] == 1
    assert store.verify() == []

    # export -> import into a fresh store: every clip's file and frames come back
    fresh = FeedbackStore(tmp_path / "fresh")
    try:
        fresh.import_folder(store.export_folder(tmp_path / "export"))
        for sid in (left, right):
            a, b = store.get_sample(sid), fresh.get_sample(sid)
            assert (clips.read_frames(a["image_file"]) == clips.read_frames(b["image_file"])).all()
            assert a["sampler_settings"] == b["sampler_settings"]
    finally:
        fresh.close()

    # the clips as a Hugging Face videofolder: one lossless AVI per clip, with metadata
    archive = client.predict(api_name="/export_videos")
    with zipfile.ZipFile(archive) as zf:
        meta = [json.loads(line) for line in zf.read("metadata.jsonl").decode().splitlines()]
        assert len(meta) == store.counts()["samples"] == 4  # 2 generated + the round's 2
        for row in meta:
            stored = clips.read_frames(store.get_sample(row["id"])["image_file"])
            assert (read_avi(zf.read(row["file_name"])) == stored).all()
            assert row["text"] == PROMPT and row["frames"] == 8
        cmp = [json.loads(line) for line in zf.read("comparisons.jsonl").decode().splitlines()]
        assert len(cmp) == 2 and cmp[0]["label_0"] == 1.0 and cmp[0]["video_0_file"].endswith(".avi")
