"""The GPU check (scripts/gpu_check.sh -> python -m bench.gpu_sd15) end to end at a tiny size on
the CPU: every estimator row, the per-step memory, block auto's h and a training round, in bf16
(the GPU's dtype) so the mixed-precision path runs too."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_gpu_check_tiny_writes_every_measurement(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, BUDGET_S="600",
               GPU_CHECK_ARGS="--tiny --dtype bf16 --steps 4 --round-steps 2 --threads 1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "out" / "gpu_sd15.log").read_text()
    assert proc.returncode == 0 and "gpu_sd15 exit 0" in proc.stdout, proc.stdout + log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["env.txt", "gpu_sd15.json", "gpu_sd15.log"]
    data = json.loads((tmp_path / "out" / "gpu_sd15.json").read_text())

    assert data["complete"] and data["model"]["name"] == "sd15-tiny-random" and data["model"]["dtype"] == "bfloat16"
    assert data["sampler"]["steps"] == 4 and data["model"]["lora"]["rank"] == 4
    rows = data["rows"]
    labels = ["full-bp (ckpt)", "truncated-bp K'=1", "truncated-bp K'=3", "ddpo (one update)", "rlr h=1",
              "rlr h=2", "rlr h=4"]
    assert [(r["row"], r["batch"]) for r in rows] == [(label, b) for b in (1, 2) for label in labels]
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        for key in ("time_s", "peak_above_gb", "reward_mean", "grad_norm"):
            assert _number(r[key]), (r["row"], key, r[key])
        assert r["time_s"] > 0 and r["peak_gb"] is None  # no CUDA allocator on the CPU
        if r["estimator"] == "rlr":
            assert r["block_used"] == min(int(r["row"][-1]), 4 - r["tail_L"]) and r["tail_L"] >= 1
    # at batch 2 every estimator has a baseline: each row produced a gradient
    assert all(r["grad_norm"] > 0 for r in rows if r["batch"] == 2)

    for batch in ("batch 1", "batch 2"):
        sm = data["step_memory"][batch]
        assert sm["B_h_gb"] > sm["B_z_gb"] > 0
        assert _number(sm["B_h_over_paper"]) and set(sm["auto_h"]) == {"24GB", "40GB", "80GB"}
        assert all(1 <= h <= 4 for h in sm["auto_h"].values())
    rnd = data["round"]
    assert rnd["steps_done"] == 2 and rnd["estimator"] == "rlr" and rnd["wrote_version"] and rnd["finite"]
    assert len(rnd["step_s"]) == 2 and all(_number(r) for r in rnd["rewards"])
    checks = {t["check"]: t for t in data["targets"]}
    assert checks["every row ran without error"]["met"] is True
    assert all(set(t) == {"check", "value", "met"} and isinstance(t["met"], bool) for t in data["targets"])
    assert "B_h (batch 1) within 2x of the paper's ~8 GB" in checks  # memory ratios need CUDA's allocator
    assert "targets" in log and "rlr h=4" in log  # the printed table


def _run_module(args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", *args, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_paper_accounting_rows_without_checkpointing(tmp_path):
    data = _run_module(["bench.gpu_sd15", "--tiny", "--no-checkpoint", "--batches", "1", "--round-steps", "0",
                        "--steps", "4", "--threads", "1"], tmp_path / "nockpt.json")
    assert data["complete"] and data["step_checkpointing"] is False and data["round"] is None
    assert [r["row"] for r in data["rows"]] == ["full-bp no-ckpt", "truncated-bp K'=1 no-ckpt",
                                                "truncated-bp K'=3 no-ckpt", "rlr h=1 L=1 no-ckpt",
                                                "rlr h=2 L=1 no-ckpt", "rlr h=4 L=1 no-ckpt"]
    for r in data["rows"]:
        assert _number(r["time_s"]) and _number(r["grad_norm"]) and r["settings"]["use_checkpoint"] is False
    assert [r["block_used"] for r in data["rows"] if r["estimator"] == "rlr"] == [1, 2, 3]  # K - L = 3 fits
    assert all(r["tail_L"] == 1 for r in data["rows"] if r["estimator"] == "rlr")


def test_video_rows_on_a_tiny_animatediff(tmp_path):
    data = _run_module(["bench.gpu_video", "--tiny", "--threads", "1"], tmp_path / "video.json")
    assert data["complete"] and data["model"]["frames"] == 4 and data["model"]["latent_shape"] == [4, 4, 8, 8]
    # the app's AnimateDiff backend, prepared as a training round prepares it
    assert data["model"]["dtype_handling"] == "backend (rlr_core.backends.animatediff)"
    assert data["training_setup"].startswith("prepare_for_training")
    assert [r["row"] for r in data["rows"]] == ["truncated-bp K'=1", "ddpo (1 inner epoch)", "rlr h=1", "rlr h=2"]
    for r in data["rows"]:
        assert _number(r["time_s"]) and _number(r["reward_mean"]) and _number(r["grad_norm"]), r
    assert data["rows"][0]["grad_norm"] > 0  # the pathwise step reaches the motion UNet's adapter


def test_sdxl_and_flow_rows_behind_their_switches(tmp_path):
    """SDXL=1 FLOW=1 (MAIN=0): bench.gpu_sdxl and bench.gpu_flow for each flow model, at a tiny size."""
    env = dict(os.environ, PYTHON=sys.executable, MAIN="0", SDXL="1", FLOW="1",
               GPU_CHECK_ARGS="--tiny --steps 4 --round-steps 1 --threads 1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("gpu_sdxl exit 0", "gpu_flow sd35m exit 0", "gpu_flow flux-dev exit 0"):
        assert line in proc.stdout, proc.stdout + (out / "gpu_flow.log").read_text()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["env.txt", "gpu_flow.log", "gpu_flow_flux-dev.json", "gpu_flow_sd35m.json", "gpu_sdxl.json",
                     "gpu_sdxl.log"] and len(names) <= 8
    for name, model in (("gpu_sdxl.json", "sdxl-tiny-random"), ("gpu_flow_sd35m.json", "sd35m-tiny-random"),
                        ("gpu_flow_flux-dev.json", "flux-dev-tiny-random")):
        data = json.loads((out / name).read_text())
        assert data["complete"] and data["model"]["name"] == model
        assert all("time_s" in r for r in data["rows"]) and data["round"]["steps_done"] == 1


def test_a_combination_of_more_than_8_files_stops_first(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PAPER="1", VIDEO="1", SDXL="1", GPU_CHECK_ARGS="--tiny")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "writes 9 files" in proc.stderr and not (tmp_path / "out").exists()
