"""Kill the app (SIGKILL) in the middle of a training round and start it again: no rating is
lost, the last good model version is still active, and the interrupted round shows as failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
ROOT = Path(__file__).resolve().parent.parent


def launch(data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RLR_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the app did not start in {timeout} s:\n{log.read_text()[-3000:]}")


def wait_for(fn, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_during_a_round_loses_nothing(tmp_path):
    from app.server import free_port

    data, log = tmp_path / "data", tmp_path / "app.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = launch(data, port, log)
    try:
        wait_ready(proc, url, log)
        client = gradio_client.Client(url, verbose=False)
        samples = client.predict("a red circle", 4, 3, 4, 3.0, api_name="/generate")
        for s, stars in zip(samples, [1, 2, 4, 5]):
            client.predict(s["sample_id"], stars, "kim", api_name="/rate")
        client.predict(samples[0]["sample_id"], samples[3]["sample_id"], "right", "kim", 0.8, api_name="/compare")

        # A first, tiny round finishes: v1 becomes the last good version.
        tiny = {"steps": 1, "batch_size": 2, "sampling_steps": 4, "samples_per_prompt": 1, "seed": 1,
                "fidelity_probe_prompts": 8}
        client.predict(tiny, "", api_name="/train_start")
        done = wait_for(lambda: (st := client.predict(api_name="/train_status"))["state"] in
                        ("finished", "failed") and st, 180, "the first round")
        assert done["state"] == "finished", done
        v1 = done["version_id"]
        # More judgements after it, then a long round that we kill while it trains.
        client.predict(samples[1]["sample_id"], 3, "lee", api_name="/rate")
        long = {"steps": 500, "batch_size": 2, "sampling_steps": 4, "seed": 2}
        client.predict(long, "", api_name="/train_start")
        wait_for(lambda: (st := client.predict(api_name="/train_status"))["history"] and st, 180,
                 "the second round to take a training step")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    proc = launch(data, port, log)
    try:
        wait_ready(proc, url, log)
        client = gradio_client.Client(url, verbose=False)
        counts = client.predict(api_name="/counts")
        assert counts["ratings"] == 5 and counts["comparisons"] == 1
        versions = client.predict(api_name="/versions")
        assert [v["version_id"] for v in versions if v["active"]] == [v1]
        status = client.predict(api_name="/train_status")  # the last finished round, from the store
        assert status["state"] == "finished" and status["version_id"] == v1 and status["history"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    from feedback_store import FeedbackStore

    with FeedbackStore(data) as store:
        rounds = store.training_rounds()
        assert [r["state"] for r in rounds] == ["finished", "failed"]
        assert "interrupted" in rounds[1]["error"]
        assert {(r["rater_id"], r["stars"]) for r in store.db["ratings"].rows} == {
            ("kim", 1), ("kim", 2), ("kim", 4), ("kim", 5), ("lee", 3)}
        assert store.verify(check_hashes=True) == []
    assert "marked 1 interrupted training round(s) as failed" in log.read_text()
