"""Small parts of the app: the flags, the state file, the worker, the prompt checks, pair order."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app import validate
from app.config import parse_args
from app.errors import AppError
from app.state import StateFile
from app.worker import JobStopped, Worker, WorkerBusy

ROOT = Path(__file__).resolve().parent.parent


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--data-dir", "--host", "--port", "--share", "--device", "--threads",
                 "--auto-train-every", "RLR_ADMIN_PASSWORD", "127.0.0.1", "7860"):
        assert flag in out.stdout


def test_flags_and_environment(monkeypatch):
    monkeypatch.setenv("RLR_PORT", "7999")
    monkeypatch.setenv("RLR_DATA_DIR", "/tmp/x")
    monkeypatch.setenv("RLR_ADMIN_PASSWORD", "pw")
    monkeypatch.delenv("SPACE_ID", raising=False)
    c = parse_args(["--device", "cpu"])
    assert (c.port, str(c.data_dir), c.host, c.admin_password, c.public) == (7999, "/tmp/x", "127.0.0.1", "pw", False)
    assert parse_args(["--port", "8000", "--share", "--device", "cpu"]).port == 8000
    assert parse_args(["--share", "--device", "cpu"]).needs_admin
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert parse_args(["--device", "cpu"]).public


def test_state_file_survives_restarts_and_damage(tmp_path):
    state = StateFile(tmp_path)
    assert state.get().active_version_id is None
    state.update(active_version_id=3, focus_stage="mid")
    assert StateFile(tmp_path).get().active_version_id == 3
    assert not list(tmp_path.glob(".state-*"))  # no temporary files left behind
    (tmp_path / "app_state.json").write_text("{not json")
    assert StateFile(tmp_path).get().active_version_id is None  # damaged: defaults, no crash
    with pytest.raises(KeyError):
        state.update(nonsense=1)


def test_worker_runs_one_job_at_a_time_and_stops_on_request():
    worker = Worker()
    started = threading.Event()

    def long_job(ctx):
        started.set()
        for step in range(1000):
            ctx.check_stop()
            ctx.log_step(step=step, reward=float(step))
            ctx.report(progress=step / 1000, message=f"step {step}")
            time.sleep(0.01)
        return "done"

    worker.submit("long", long_job)
    assert started.wait(5)
    with pytest.raises(WorkerBusy):
        worker.submit("second", lambda ctx: None)
    assert worker.stop()
    assert worker.wait(5)
    status = worker.status()
    assert status.state == "stopped" and status.history and status.error is None
    assert worker.submit("next", lambda ctx: 42) > 0 and worker.wait(5)
    assert worker.status().state == "finished" and worker.status().result == 42


def test_a_failing_job_reports_and_the_worker_lives_on():
    worker = Worker()
    worker.submit("bad", lambda ctx: 1 / 0)
    assert worker.wait(5)
    assert worker.status().state == "failed" and "ZeroDivisionError" in worker.status().error

    def stops(ctx):
        raise JobStopped()

    worker.submit("stops", stops)
    assert worker.wait(5) and worker.status().state == "stopped"
    worker.submit("ok", lambda ctx: "fine")
    assert worker.wait(5) and worker.status().result == "fine"


@pytest.mark.parametrize("value,ok", [(3, 3), (3.0, 3), ("4", 4)])
def test_whole_numbers_accept_what_browsers_send(value, ok):
    assert validate.whole(value, "n", 1, 5) == ok


@pytest.mark.parametrize("value", [0, 6, 2.5, "x", None, True, float("nan"), float("inf"), ""])
def test_whole_numbers_refuse_the_rest(value):
    with pytest.raises(AppError, match="n must be a whole number from 1 to 5"):
        validate.whole(value, "n", 1, 5)


def test_rater_names():
    assert validate.rater("  Ada L. ") == "Ada L."
    for bad in ["", "   ", None, "a/b", "x" * 65, "<script>"]:
        with pytest.raises(AppError):
            validate.rater(bad)


def test_prompt_note_names_unknown_words(builtin_backend):
    assert "dragon" in builtin_backend.describe_prompt("a red dragon")
    assert "the model reads" in builtin_backend.describe_prompt("A BIG red circle")
    assert "limit" in builtin_backend.describe_prompt("a " * 600)
