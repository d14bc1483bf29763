"""GPU check: the estimators on Stable Diffusion 1.5's real architecture (random weights, bf16).

    python -m bench.gpu_sd15 [--json bench/results/gpu_sd15.json] [--budget-s 450]
    python -m bench.gpu_sd15 --tiny --json OUT.json       # a tiny model on the CPU (the test)

For a GPU machine without hub access (``scripts/gpu_check.sh`` runs it). Builds SD 1.5's UNet,
VAE and CLIP text encoder from their configurations (:mod:`bench.sd_models`), puts a rank-4 LoRA
on the UNet, and with a simple differentiable reward on the decoded 512x512 pixels measures,
per gradient estimate (50 sampling steps, eta 1, CFG; batch 1 and 2):

    time_s     wall time of one estimate (each row timed once, after a warm-up estimate)
    peak_gb    the CUDA allocator's peak during it (torch.cuda.max_memory_allocated, reset
               before each row), weights included; peak_above_gb: above what was allocated before

for full BP (checkpointed), truncated BP K'=1 and 3, DDPO (one update: sampling + its inner
epochs) and RLR h = 1, 2, 4. Also B_h and B_z (one kept step, one forward-only step:
``measure_step_memory``) against the paper's ~8 GB and ~0.24 GB, the h that ``block="auto"``
picks for 24, 40 and 80 GB, and a 5-step training round of the app's round code (default RLR).

The JSON is rewritten after every row, so a run cut short keeps what it measured; rows that would
start after ``--budget-s`` seconds are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.common import machine, print_table
from bench.estimators import PeakMemory
from bench.sd_models import PROMPTS, build_backend, redness
from rlr_core.estimators import DDPO, RLR, make_estimator
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.estimators.memory import measure_step_memory
from rlr_core.sampler import SamplerSettings
from rlr_core.training import TrainConfig, lora, run_round

GB = 2**30
PAPER_B_H_GB, PAPER_B_Z_GB = 8.0, 0.24
BUDGETS_GB = (24, 40, 80)
ROWS: list[tuple[str, str, dict]] = [
    ("full-bp (ckpt)", "full-bp", {}),
    ("truncated-bp K'=1", "truncated-bp", {"steps": 1}),
    ("truncated-bp K'=3", "truncated-bp", {"steps": 3}),
    ("ddpo (one update)", "ddpo", {}),
    ("rlr h=1", "rlr", {"block": 1}),
    ("rlr h=2", "rlr", {"block": 2}),
    ("rlr h=4", "rlr", {"block": 4}),
]
# The paper's memory accounting (--no-checkpoint): every kept step holds its graph, and RLR's FO
# tail is one step (L=1), so the peak grows by about B_h per step of the block.
ROWS_NO_CKPT: list[tuple[str, str, dict]] = [
    ("full-bp no-ckpt", "full-bp", {"use_checkpoint": False}),
    ("truncated-bp K'=1 no-ckpt", "truncated-bp", {"steps": 1, "use_checkpoint": False}),
    ("truncated-bp K'=3 no-ckpt", "truncated-bp", {"steps": 3, "use_checkpoint": False}),
    *[(f"rlr h={h} L=1 no-ckpt", "rlr", {"block": h, "tail": 1, "use_checkpoint": False}) for h in (1, 2, 4)],
]


class Report:
    """Everything measured so far; ``write`` rewrites the JSON (after every row)."""

    def __init__(self, path: Path | None, header: dict):
        self.path = path
        self.data: dict = {"machine": machine(), **header, "rows": [], "step_memory": {}, "auto_block": {},
                           "round": None, "targets": [], "complete": False}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def judge(self, data: dict) -> list[dict]:
        """The checks judged from what was measured (a model's own report gives its own)."""
        return targets(data)

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.data["targets"] = self.judge(self.data)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            tmp.replace(self.path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / GB if device.type == "cuda" else None


def measure_row(chain: BackendChain, label: str, name: str, settings: dict, batch: int, seed: int) -> dict:
    """One estimate of ``name`` at ``batch``: its time, peak memory and what it produced."""
    params = chain.parameters()
    device = chain.backend.device
    est = make_estimator(name, **settings)
    row: dict = {"row": label, "estimator": name, "settings": settings, "batch": batch}
    for p in params:
        p.grad = None
    ctx = chain.context([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    saved = [p.detach().clone() for p in params] if isinstance(est, DDPO) else None
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        gen = torch.Generator("cpu").manual_seed(seed)
        if isinstance(est, DDPO):  # one update: sampling, then its inner epochs of optimiser steps
            result = est.update(chain, ctx, gen, torch.optim.AdamW(params, lr=1e-4))
            row["settings"] = {"inner_epochs": est.inner_epochs, "chunk": est.chunk}
        else:
            result = est.accumulate(chain, ctx, gen)
        _sync(device)
        row["time_s"] = time.perf_counter() - start
    row["peak_above_gb"] = mem.mb / 1024
    row["peak_gb"] = _peak_gb(device)
    row["reward_mean"] = result.reward_mean
    grads = [p.grad.detach().float().flatten() for p in params if p.grad is not None]
    row["grad_norm"] = float(torch.cat(grads).norm()) if grads else 0.0
    if isinstance(est, RLR):
        row["block_used"], row["tail_L"] = result.stats["block"], result.stats["tail"]
    if saved is not None:  # DDPO stepped the adapter: restore it for the rows that follow
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    for p in params:
        p.grad = None
    return row


def step_memory(chain: BackendChain, batch: int) -> dict:
    ctx = chain.context(PROMPTS[:batch] if batch <= len(PROMPTS) else PROMPTS * batch)
    b_h, b_z = measure_step_memory(chain, ctx)
    tail = RLR().tail_length(chain)
    auto = {}
    for budget in BUDGETS_GB:  # the estimator's own choice ("auto"), from its own measurement
        est = RLR(block="auto", memory_budget_gb=budget)
        auto[f"{budget}GB"] = est.block_size(chain, ctx, tail)
    return {"B_h_gb": b_h / GB, "B_z_gb": b_z / GB, "B_h_over_paper": b_h / GB / PAPER_B_H_GB,
            "B_z_over_paper": b_z / GB / PAPER_B_Z_GB, "tail_L": tail, "auto_h": auto}


def training_round(backend, sampler: SamplerSettings, steps: int, batch: int) -> dict:
    """The app's round code, default RLR, fresh rank-4 LoRA; the version goes to a temporary folder."""
    lora.remove_lora(backend)
    config = TrainConfig(steps=steps, batch=batch, prompts=list(PROMPTS), sampler=sampler, lora_rank=4)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def progress(p) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    device = backend.device
    with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as mem:
        result = run_round(backend, redness, config, Path(tmp) / "version", progress=progress)
        _sync(device)
        wrote = result.version is not None and (result.version / lora.LORA_WEIGHTS).is_file()
    m = result.metrics
    rewards = [h["reward_mean"] for h in m["history"]]
    return {"steps_done": m["steps_done"], "batch": batch, "estimator": m["estimator"],
            "estimator_settings": {k: v for k, v in m["history"][-1].items() if k in ("tail", "block")} if rewards
            else {}, "elapsed_s": m["elapsed_s"], "step_s": step_times, "peak_gb": _peak_gb(device),
            "peak_above_gb": mem.mb / 1024, "rewards": rewards, "wrote_version": wrote,
            "finite": all(math.isfinite(r) for r in rewards)}


def _row(rows: list[dict], label: str, batch: int) -> dict | None:
    return next((r for r in rows if r["row"] == label and r["batch"] == batch and "time_s" in r), None)


def targets(data: dict) -> list[dict]:
    """Checks judged from what was measured (missing measurements are left out)."""
    out = []
    rows = data["rows"]
    for h, limit, batch in ((2, 40, 1), (2, 24, 1), (1, 24, 1), (4, 40, 2)):
        r = _row(rows, f"rlr h={h}", batch)
        if r and r.get("peak_gb") is not None:
            out.append({"check": f"RLR h={h} peak memory <= {limit} GB at batch {batch}",
                        "value": f"{r['peak_gb']:.2f} GB", "met": r["peak_gb"] <= limit})
    for batch in (1, 2):
        r, t = _row(rows, "rlr h=2", batch), _row(rows, "truncated-bp K'=3", batch)
        if r and t and t["peak_above_gb"] > 0:
            ratio = r["peak_above_gb"] / t["peak_above_gb"]
            out.append({"check": f"RLR h=2 memory <= 1.5x truncated BP K'=3 at batch {batch}",
                        "value": f"{ratio:.2f}x", "met": ratio <= 1.5})
    sm = data["step_memory"].get("batch 1")
    r2, r4 = _row(rows, "rlr h=2 L=1 no-ckpt", 1), _row(rows, "rlr h=4 L=1 no-ckpt", 1)
    if sm and "B_h_gb" in sm and r2 and r4:
        ratio = (r4["peak_above_gb"] - r2["peak_above_gb"]) / (2 * sm["B_h_gb"])
        out.append({"check": "no-ckpt RLR: peak(h=4) - peak(h=2) within 50% of 2 B_h (batch 1)",
                    "value": f"{ratio:.2f} x 2 B_h", "met": 0.5 <= ratio <= 1.5})
    if sm and "B_h_gb" in sm:
        out.append({"check": "B_h (batch 1) within 2x of the paper's ~8 GB", "value": f"{sm['B_h_gb']:.2f} GB",
                    "met": 0.5 <= sm["B_h_over_paper"] <= 2.0})
        out.append({"check": "B_z (batch 1) within 2x of the paper's ~0.24 GB", "value": f"{sm['B_z_gb']:.3f} GB",
                    "met": 0.5 <= sm["B_z_over_paper"] <= 2.0})
        out.append({"check": "block auto picks h >= 2 at 24 GB (batch 1)", "value": str(sm["auto_h"]["24GB"]),
                    "met": sm["auto_h"]["24GB"] >= 2})
    done = [r for r in rows if "time_s" in r]
    if rows:
        out.append({"check": "every row ran without error", "value": f"{len(done)}/{len(rows)}",
                    "met": len(done) == len(rows)})
    rnd = data["round"]
    if rnd and "steps_done" in rnd:
        out.append({"check": "5-step training round finished, finite rewards, version written",
                    "value": f"{rnd['steps_done']} steps, {rnd['elapsed_s']:.1f} s",
                    "met": rnd["steps_done"] == 5 and rnd["finite"] and rnd["wrote_version"]})
    return out


def run_rows(chain: BackendChain, report: Report, batch: int, budget_s: float,
             rows: list[tuple[str, str, dict]] = ROWS) -> None:
    """Warm up at this batch size (one untimed K'=1 estimate), then time every row once."""
    warm = time.perf_counter()
    measure_row(chain, "warm-up", "truncated-bp", {"steps": 1}, batch, seed=1)
    report.data.setdefault("warmup_s", {})[f"batch {batch}"] = time.perf_counter() - warm
    for label, name, settings in rows:
        if report.elapsed() > budget_s:
            report.data["rows"].append({"row": label, "estimator": name, "batch": batch, "skipped": "time budget"})
            report.write()
            continue
        try:
            row = measure_row(chain, label, name, settings, batch, seed=100 + batch)
        except torch.cuda.OutOfMemoryError as err:
            row = {"row": label, "estimator": name, "batch": batch, "error": f"out of memory: {str(err)[:200]}"}
        except Exception as err:  # noqa: BLE001  a broken row must not lose the others
            traceback.print_exc()
            row = {"row": label, "estimator": name, "batch": batch, "error": f"{type(err).__name__}: {err}"[:300]}
        if chain.backend.device.type == "cuda":
            torch.cuda.empty_cache()
        report.data["rows"].append(row)
        report.write()
        print(_fmt_row(row), flush=True)


def _fmt_row(r: dict) -> str:
    if "time_s" not in r:
        return f"{r['row']:<20} batch {r['batch']}: {r.get('error') or r.get('skipped')}"
    peak = f"{r['peak_gb']:.2f} GB" if r.get("peak_gb") is not None else f"{r['peak_above_gb'] * 1024:.0f} MB RSS"
    return f"{r['row']:<20} batch {r['batch']}: {r['time_s']:.2f} s, peak {peak}"


def run(args: argparse.Namespace) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    backend, info = build_backend(args.tiny, args.device, dtype)
    if args.vae_checkpoint:
        backend.vae.enable_gradient_checkpointing()  # the reward's backward through the 512x512 decoder
    sampler = SamplerSettings(steps=args.steps, eta=1.0, guidance=args.guidance)
    header = {"model": {**info, "build_s": time.perf_counter() - t0, "vae_checkpointing": args.vae_checkpoint},
              "step_checkpointing": not args.no_checkpoint,
              "sampler": vars(sampler) | {"lora_rank": 4, "reward": "redness of the decoded pixels"},
              "paper": {"B_h_gb": PAPER_B_H_GB, "B_z_gb": PAPER_B_Z_GB}, "budget_s": args.budget_s}
    report = Report(args.json, header)
    report.write()
    print(f"{info['name']}: {info['params']} parameters, {info['dtype']} on {args.device} "
          f"({info['dtype_handling']}); built in {header['model']['build_s']:.1f} s", flush=True)
    return measure(backend, sampler, report, args, ROWS_NO_CKPT if args.no_checkpoint else ROWS)


def measure(backend, sampler: SamplerSettings, report: Report, args: argparse.Namespace,
            rows: list[tuple[str, str, dict]], step_memory_of=step_memory) -> dict:
    """The measurements after the model is built (shared by gpu_sdxl and gpu_flow): a rank-4 LoRA,
    each batch's step memory (``step_memory_of``), then per batch every row and, after the first
    batch, the training round; the report is written after each. Returns the report's data."""
    params = lora.add_lora(backend, rank=4, seed=0)
    report.data["model"]["lora"] = {"rank": 4, "params": sum(p.numel() for p in params), "dtype": str(params[0].dtype)}
    chain = BackendChain(backend, redness, sampler)
    for batch in args.batches:
        try:
            report.data["step_memory"][f"batch {batch}"] = step_memory_of(chain, batch)
        except Exception as err:  # noqa: BLE001  a failed measurement must not lose the rows
            report.data["step_memory"][f"batch {batch}"] = {"error": f"{type(err).__name__}: {err}"[:300]}
        if backend.device.type == "cuda":
            torch.cuda.empty_cache()
        report.write()
        print(f"step memory, batch {batch}: {report.data['step_memory'][f'batch {batch}']}", flush=True)
    for i, batch in enumerate(args.batches):
        run_rows(chain, report, batch, args.budget_s, rows)
        if i == 0 and args.round_steps:  # the round before the larger batch: it matters more if time runs out
            if report.elapsed() > args.budget_s:
                report.data["round"] = {"skipped": "time budget"}
                continue
            try:
                report.data["round"] = training_round(backend, sampler, args.round_steps, args.round_batch)
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                report.data["round"] = {"error": f"{type(err).__name__}: {err}"[:300]}
            lora.add_lora(backend, rank=4, seed=0)  # a fresh adapter again for the remaining rows
            chain = BackendChain(backend, redness, sampler)
            report.write()
            print(f"round: {report.data['round']}", flush=True)
    report.data["complete"] = True
    report.write()
    return report.data


def print_summary(data: dict, title: str, json_path: Path | None, step_columns: list[str]) -> None:
    """The rows, the per-step memory with block auto's h, and the targets, as tables."""
    done = [r for r in data["rows"] if "time_s" in r]
    print_table(done, ["row", "batch", "time_s", "peak_gb", "peak_above_gb", "block_used", "tail_L", "grad_norm"],
                title=title)
    sm = [{"batch": k, **{x: v for x, v in s.items() if x != "auto_h"}, **s.get("auto_h", {})}
          for k, s in data["step_memory"].items()]
    print_table(sm, ["batch", *step_columns, *(f"{b}GB" for b in BUDGETS_GB)],
                title="per-step memory and block auto's h")
    print_table(data["targets"], ["check", "value", "met"], title="targets")
    if json_path:
        print(f"\nwrote {json_path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model with the same structure, on the CPU, 6 steps")
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/gpu_sd15.json (none with --tiny)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default 50; 6 with --tiny)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1 switches it off)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--round-steps", type=int, default=5)
    p.add_argument("--round-batch", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds")
    p.add_argument("--no-vae-checkpoint", dest="vae_checkpoint", action="store_false")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="the paper's accounting: rows without per-step checkpointing, RLR with L=1")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.steps = args.steps or (6 if args.tiny else 50)
    if args.json is None and not args.tiny:
        args.json = Path("bench/results/gpu_sd15.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args)
    print_summary(data, f"{data['model']['name']} ({data['model']['dtype']}), K={args.steps}, CFG {args.guidance}",
                  args.json, ["B_h_gb", "B_z_gb", "B_h_over_paper", "B_z_over_paper", "tail_L"])


if __name__ == "__main__":
    main()
