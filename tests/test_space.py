"""The Space folder: it builds, starts as a Space would run it (SPACE_ID set, `spaces` installed),
serves, generates, rates, and trains a round as short chunks (the ZeroGPU path, on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from app import space
from app.server import free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "test-admin-password"


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_folder_has_front_matter_requirements_app_and_models(tmp_path: Path) -> None:
    out = space.build(tmp_path / "space", hardware="cpu-basic")
    meta = front_matter(out / "README.md")
    requirements = (ROOT / "requirements.txt").read_text()
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == space.pinned(requirements, "gradio") == "6.31.0"
    assert meta["hf_oauth"] is True and meta["python_version"] == "3.11"
    assert meta["suggested_hardware"] == "cpu-basic" and 0 < len(meta["short_description"]) <= 60
    assert (out / meta["app_file"]).is_file()
    reqs = (out / "requirements.txt").read_text().splitlines()
    assert f"torch=={space.pinned(requirements, 'torch')}" in reqs and space.SPACES_PIN in reqs
    assert "gradio==6.31.0" in reqs
    for rel in ["models/shapesworld-tiny/unet/diffusion_pytorch_model.safetensors",
                "models/perception/model.safetensors", "models/presence/model.safetensors", "app/ui.py",
                "rlr_core/training/chunked.py",
                "feedback_store/store.py", "app/static/keys.js"]:
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("__pycache__"))


def test_build_refuses_a_non_empty_folder_and_unknown_hardware(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        space.build(tmp_path / "x")
    with pytest.raises(SystemExit, match="hardware"):
        space.build(tmp_path / "y", hardware="gpu-9000")
    with pytest.raises(SystemExit, match="refusing"):
        space.build(ROOT / "app" / "space-out")


def wait_for_page(proc: subprocess.Popen, url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the Space exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Space did not serve within {timeout} s:\n{log.read_text()[-3000:]}")


def test_the_space_starts_serves_generates_and_trains_in_chunks(tmp_path: Path) -> None:
    pytest.importorskip("spaces")
    out = space.build(tmp_path / "space")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLR_", "SPACES_", "GRADIO_"))}
    env.update(SPACE_ID="tester/rlr-feedback", RLR_PORT=str(port), RLR_HOST="127.0.0.1", RLR_THREADS="1",
               RLR_ADMIN_PASSWORD=PASSWORD, RLR_CHUNKED_TRAINING="1", RLR_GPU_CHUNK_SECONDS="0.001",
               PYTHONPATH="")  # no RLR_DATA_DIR: data in ./data, so the no-bucket banner shows
    log = tmp_path / "space.log"
    proc = subprocess.Popen([sys.executable, "space_app.py"], cwd=out, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(proc, url, log)
        with urllib.request.urlopen(url + "config", timeout=10) as r:
            config = r.read().decode()
        assert "wiped when the Space restarts" in config  # the storage banner
        from gradio_client import Client

        client = Client(url, verbose=False)
        samples = client.predict("a red circle", 2, 0, 4, 3.0, api_name="/generate")
        assert len(samples) == 2 and samples[0]["image_png_b64"]
        rater = client.predict(api_name="/rater_token")["rater_token"]  # a public app takes no rater names
        client.predict(samples[0]["sample_id"], 5, rater, api_name="/rate")
        client.predict(samples[1]["sample_id"], 1, rater, api_name="/rate")
        assert client.predict(api_name="/counts")["ratings"] == 2
        assert (out / "data" / "feedback.db").is_file()  # the Space folder's own disk

        settings = {"steps": 3, "batch_size": 2, "sampling_steps": 3, "max_prompts": 1, "samples_per_prompt": 1,
                    "sample_steps": 2, "seed": 0}
        client.predict(settings, PASSWORD, api_name="/train_start")
        deadline = time.time() + 300
        while (status := client.predict(api_name="/train_status"))["state"] in ("queued", "running", "stopping"):
            assert time.time() < deadline, status
            time.sleep(1)
        assert status["state"] == "finished", status
        newest = client.predict(api_name="/versions")[-1]
        assert newest["metrics"]["chunks"] == 3 and newest["metrics"]["steps_done"] == 3  # one step per GPU call
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
