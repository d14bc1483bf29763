"""The SDXL GPU check (python -m bench.gpu_sdxl) end to end at a tiny size on the CPU: every
estimator row, the per-step memory, block auto's h and a training round, through the app's
SDXL backend."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_gpu_sdxl_tiny_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu_sdxl.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_sdxl", "--tiny", "--json", str(out), "--batches", "2",
                           "--round-steps", "2", "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and data["model"]["name"] == "sdxl-tiny-random"
    assert data["model"]["params"]["text_encoder_2"] > 0 and data["sampler"]["steps"] == 6
    rows = data["rows"]
    assert [r["row"] for r in rows] == ["full-bp (ckpt)", "truncated-bp K'=1", "ddpo (one update)", "rlr h=2",
                                        "rlr h=4"]
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        for key in ("time_s", "peak_above_gb", "reward_mean", "grad_norm"):
            assert _number(r[key]), (r["row"], key, r[key])
        assert r["grad_norm"] > 0 and r["peak_gb"] is None  # batch 2: every estimator has a baseline
    assert [r["block_used"] for r in rows if r["estimator"] == "rlr"] == [2, 4]  # 6 steps, tail L = 2
    sm = data["step_memory"]["batch 2"]
    assert sm["B_h_gb"] > sm["B_z_gb"] > 0 and set(sm["auto_h"]) == {"24GB", "40GB", "80GB"}
    rnd = data["round"]
    assert rnd["steps_done"] == 2 and rnd["finite"] and rnd["wrote_version"]
    assert all(t["met"] for t in data["targets"]), data["targets"]
