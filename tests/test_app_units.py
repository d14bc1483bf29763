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


def start_fails(args: list[str], env: dict[str, str], tmp_path: Path) -> str:
    """Run app.py as a person would; it must stop with exit code 2 and one line, no traceback."""
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("RLR_")}
    out = subprocess.run([sys.executable, "app.py", "--data-dir", str(tmp_path / "data"), *args], cwd=ROOT,
                         env={**clean, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert not (tmp_path / "data").exists()  # it stopped before touching the data folder
    return lines[0]


@pytest.mark.parametrize("env,words", [
    ({"RLR_PORT": "abc"}, ["RLR_PORT", "--port", "'abc'", "whole number"]),
    ({"RLR_THREADS": "x"}, ["RLR_THREADS", "--threads", "'x'"]),
    ({"RLR_AUTO_TRAIN_EVERY": "-1"}, ["RLR_AUTO_TRAIN_EVERY", "'-1'"]),
    ({"RLR_SHARE": "maybe"}, ["RLR_SHARE", "'maybe'"]),
])
def test_bad_environment_values_stop_with_one_line(tmp_path, env, words):
    line = start_fails([], env, tmp_path)
    assert all(w in line for w in words), line


def test_a_port_in_use_names_the_port_setting(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = start_fails(["--port", str(port)], {}, tmp_path)
    assert f"127.0.0.1:{port}" in line and "--port" in line and "RLR_PORT" in line and "launch()" not in line


def test_a_cuda_device_that_is_not_there(tmp_path):
    import torch

    if torch.cuda.is_available():
        line = start_fails(["--device", f"cuda:{torch.cuda.device_count()}"], {}, tmp_path)
        assert f"has {torch.cuda.device_count()} CUDA GPU" in line
    else:
        line = start_fails(["--device", "cuda"], {}, tmp_path)
        assert "--device is cuda" in line and "no CUDA GPU" in line and "--device cpu" in line
    assert "gpu" in start_fails([], {"RLR_DEVICE": "gpu"}, tmp_path)  # not a device at all


def test_the_start_banner_names_the_apps_own_flags(tmp_path):
    """Gradio's banner says to set `share=True` in `launch()`; the app's own lines say --share."""
    import os

    from app.server import free_port

    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RLR_")}, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(tmp_path / "data"), "--port", str(port),
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(240, proc.kill)  # a hung start ends the read below
    watchdog.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl+C" in line:
                break
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(30)
    out = "".join(lines)
    assert "Ctrl+C" in out, out
    assert f"open http://127.0.0.1:{port}/" in out and "--share" in out
    assert "launch()" not in out and "share=True" not in out, out


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


def test_round_defaults_are_the_benchmarks_pick_for_the_loaded_model(builtin_backend):
    from app.round_config import DEFAULTS, RoundConfig, defaults_for
    from rlr_core.backends.loading import load_backend
    from tests.clip_model import clip_model_dir

    builtin = defaults_for(builtin_backend)  # the loop benchmark's pick on the built-in image model
    picked = RoundConfig.parse({}, builtin)
    assert (picked.training.estimator.name, picked.training.estimator.options) == (
        "rlr", {"block": 2, "rest": "lr", "kl_coef": 0.3})
    assert picked.fidelity_weight == 1.0 and picked.patience == 0
    assert {k: v for k, v in builtin.items() if DEFAULTS[k] != v} == {
        "patience": 0, "fidelity_weight": 1.0, "kl_coef": 0.3, "steps": 10, "batch_size": 6, "learning_rate": 6e-3,
        "fidelity_check_every": 0, "fidelity_probe_prompts": 32, "fidelity_rule": "attributes"}
    assert defaults_for(load_backend(clip_model_dir())) == DEFAULTS  # no loop benchmark on clips: the form's
    chosen = RoundConfig.parse({"estimator": "truncated-bp", "kl_coef": 0}, builtin)  # a person's choice wins
    assert chosen.training.estimator.name == "truncated-bp" and "kl_coef" not in chosen.training.estimator.options
    assert RoundConfig.parse(chosen.public(), builtin) == chosen


def test_round_config_nests_the_estimator_options_and_reads_back_its_public_form():
    from app.round_config import DEFAULTS, RoundConfig

    default = RoundConfig.parse(None)
    assert default.public() == DEFAULTS == RoundConfig().public()
    assert default.training.estimator.name == "rlr" and default.training.estimator.options == {"block": 2,
                                                                                             "rest": "lr"}
    raw = {"estimator": "truncated-bp", "steps": "3", "batch_size": 4, "sampling_steps": 5, "truncation": 9,
           "guidance": 2, "sample_steps": 6, "seed": 11}
    config = RoundConfig.parse(raw)
    t = config.training
    assert t.estimator.options == {"steps": 5}  # no more than the chain has
    assert (t.steps, t.batch, t.sampler.steps, t.sampler.guidance, config.samples.steps) == (3, 4, 5, 2.0, 6)
    assert RoundConfig.parse(config.public()) == config  # what the store and auto-train keep reads back
    assert config.public()["truncation"] == 5 and config.public()["seed"] == 11

    run = RoundConfig.parse({"block": 3}).for_round(["a red circle"], {}, 7, (0.25, 0.5), (2, 4))
    assert run.estimator.options == {"block": 3, "rest": "lr", "window": (2, 4)}
    assert (run.prompts, run.stage_prompts, run.seed, run.stage_boundaries) == (["a red circle"], None, 7, (0.25, 0.5))


@pytest.mark.parametrize("raw,match", [
    ({"estimatr": "ddpo"}, "unknown round setting.*estimatr"), ("steps=3", "object of name: value"),
    ({"estimator": "sgd"}, "estimator must be one of"), ({"batch_size": 1}, "batch size"),
    ({"learning_rate": "fast"}, "learning rate"), ({"seed": -1}, "seed"),
])
def test_round_config_refuses_bad_settings(raw, match):
    from app.round_config import RoundConfig

    with pytest.raises(AppError, match=match):
        RoundConfig.parse(raw)


def test_train_config_reads_nested_and_older_flat_estimator_settings():
    from rlr_core.training import EstimatorConfig, TrainConfig

    config = TrainConfig(estimator=EstimatorConfig("rlr", {"block": 1, "window": (2, 3)}), stage_boundaries=(0.2, 0.5))
    assert TrainConfig.from_dict(config.to_dict()).estimator == EstimatorConfig("rlr", {"block": 1, "window": (2, 3)})
    assert TrainConfig.from_dict(config.to_dict()).stage_boundaries == (0.2, 0.5)
    old = TrainConfig.from_dict({"estimator": "ddpo", "estimator_options": {"inner_epochs": 2}, "steps": 3})
    assert old.estimator == EstimatorConfig("ddpo", {"inner_epochs": 2}) and old.steps == 3
    assert TrainConfig(estimator="full-bp").estimator == EstimatorConfig("full-bp")


def test_the_round_plots_the_spread_of_each_steps_own_samples():
    """RLR's state baseline calls the reward again on x_0 predictions after the step's samples:
    the plotted spread is the first call's of each step."""
    import torch

    from app.training_job import ProxyReward
    from rlr_core.feedback.encoders import PerceptionImageEncoder
    from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
    from rlr_core.feedback.reward_proxy import RewardProxy

    torch.manual_seed(0)
    proxy = RewardProxy(PerceptionImageEncoder(), BagOfWordsPromptEncoder())
    reward = ProxyReward(proxy)
    samples, predictions = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32) * 0.1
    spread = lambda x: float(proxy.head_rewards(x, ["a red circle"] * 4).detach().std(0).mean())
    reward(samples, ["a red circle"] * 4)
    reward(predictions, ["a red circle"] * 4)
    assert reward.observe()["uncertainty"] == pytest.approx(spread(samples)) != pytest.approx(spread(predictions))
    reward(predictions, ["a red circle"] * 4)  # the next step's first call
    assert reward.observe()["uncertainty"] == pytest.approx(spread(predictions))
