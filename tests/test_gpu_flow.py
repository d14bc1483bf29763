"""The flow models' GPU check (python -m bench.gpu_flow) end to end at a tiny size on the CPU, for
SD3.5-Medium's and FLUX.1-dev's structure: every estimator row, the per-step memory, block auto's h
and a training round, through the app's flow backends; and the full-size configurations built on
the meta device have the published parameter counts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.parametrize("model,family,steps", [("sd35m", "stable-diffusion-3", 10), ("flux-dev", "flux", 6)])
def test_gpu_flow_tiny_writes_every_measurement(tmp_path, model, family, steps):
    out = tmp_path / f"gpu_flow_{model}.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_flow", "--model", model, "--tiny", "--json", str(out),
                           "--batches", "2", "--round-steps", "2", "--threads", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["complete"] and data["model"]["name"] == f"{model}-tiny-random" and data["model"]["family"] == family
    assert data["sampler"]["steps"] == steps  # the family's round default
    assert data["model"]["guidance"] == ("embedded" if family == "flux" else "CFG")
    rows = data["rows"]
    assert [r["row"] for r in rows] == ["full-bp (ckpt)", "truncated-bp K'=1", "ddpo (one update)", "rlr h=2",
                                        "rlr h=4"]
    for r in rows:
        assert "error" not in r and "skipped" not in r, r
        for key in ("time_s", "peak_above_gb", "reward_mean", "grad_norm"):
            assert _number(r[key]), (r["row"], key, r[key])
        assert r["grad_norm"] > 0 and r["peak_gb"] is None
    assert [r["block_used"] for r in rows if r["estimator"] == "rlr"] == [2, 4]
    sm = data["step_memory"]["batch 2"]
    assert sm["B_h_gb"] > sm["B_z_gb"] > 0 and set(sm["auto_h"]) == {"24GB", "40GB", "80GB"}
    rnd = data["round"]
    assert rnd["steps_done"] == 2 and rnd["finite"] and rnd["wrote_version"]
    assert all(t["met"] for t in data["targets"]), data["targets"]


def test_the_full_size_configurations_are_the_published_models():
    from bench.gpu_flow import build_backend

    sd3, info = build_backend("sd35m", False, "meta", torch.bfloat16)
    pos = sd3.transformer.pos_embed.pos_embed.numel()  # a buffer: stored in the checkpoint, not trained
    assert 2.45e9 < info["params"]["transformer"] + pos < 2.5e9  # SD3.5-Medium: "2.5 B"
    assert 4.7e9 < info["params"]["text_encoder_3"] < 4.8e9  # T5 v1.1 XXL's encoder
    assert info["image_size"] == [1024, 1024] and info["latent_shape"] == [16, 128, 128]
    flux, info = build_backend("flux-dev", False, "meta", torch.bfloat16)
    assert 11.8e9 < info["params"]["transformer"] < 12e9  # FLUX.1-dev: "12 B"
    assert flux.guidance_embeds and flux.image_seq_len == 4096 and info["image_size"] == [1024, 1024]
