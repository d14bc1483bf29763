"""Benchmark: gradient estimators against the exact gradient on the built-in model.

    python -m bench.estimators [--quick] [--json OUT] [--model DIR] [--device cuda]

Setting: the built-in model with a fresh LoRA adapter (rank 4, as a first training round
starts), a fixed differentiable reward (perception-model fidelity of the prompt), fixed prompts.
The reference gradient is the mean of ``--n-ref`` full-backprop gradients (exact per trajectory,
so their mean is the truth up to its own reported standard error). Each estimator setting is
drawn ``--n-est`` times (one batch each, fresh seeds), and reports:

    bias/SE     ||mean - ref|| / sqrt(sum of both means' squared SEs): about 1 when unbiased
    variance    trace of the per-sample covariance (batch x covariance of batch estimates)
    cosine      mean cosine similarity of one batch's estimate to the reference
    time_s      wall time per estimate;  mem_mb  peak memory per estimate above the baseline
    err_1s      relative error of the average of the estimates one second of compute buys:
                sqrt(bias^2 + tr Cov_batch * time_s / 1 s) / ||ref||  (lower is better;
                the equal-compute comparison the method doc asks for)

The rows: full BP, truncated BP (K' = 1, 2), LR (= DDPO's first inner step), and RLR over
h in {1, 2, 4} and rest-of-chain term in {lr, zo, none}, plus lr subsampled to m = 4 steps.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import print_table, write_json
from rlr_core import builtin_model, lora, rewards
from rlr_core.backend import BuiltinBackend
from rlr_core.builtin_model import DEFAULT_MODEL_DIR
from rlr_core.estimators import Estimator, make_estimator
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.sampler import SamplerSettings

PROMPTS = ["a large red circle on the left, black background", "a small blue square in the center",
           "a yellow triangle on the right, navy background", "a large green circle, white background"]


def settings_grid(quick: bool) -> list[tuple[str, str, dict]]:
    """(label, estimator, settings) rows."""
    rows = [("full-bp", "full-bp", {}), ("truncated-bp K'=1", "truncated-bp", {"steps": 1}),
            ("truncated-bp K'=2", "truncated-bp", {"steps": 2}), ("lr (=ddpo step 1)", "lr", {})]
    blocks, rests = ([1, 2], ["lr", "zo", "none"]) if quick else ([1, 2, 4], ["lr", "zo", "none"])
    for rest in rests:
        for h in blocks:
            rows.append((f"rlr h={h} rest={rest}", "rlr", {"block": h, "rest": rest}))
    rows.append(("rlr h=2 rest=lr m=4", "rlr", {"block": 2, "rest": "lr", "rest_steps": 4}))
    if quick:
        rows = [r for r in rows if r[0] not in ("truncated-bp K'=2",)]
    return rows


class PeakMemory:
    """Peak memory of a block of code above what was in use when it started, in MB.

    CUDA: the allocator's peak. CPU (Linux): the process's peak RSS (VmHWM), reset on entry
    through /proc/self/clear_refs; elsewhere 0 (not measured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) / 1024
        return 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._base = self._status("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        elif self._base is not None:
            self.mb = self._status("VmHWM") - self._base


@dataclass
class Draws:
    grads: torch.Tensor  # (n, P): one batch-mean estimate of grad J per row
    seconds: list[float]
    memory_mb: list[float]


def draw(chain: BackendChain, est: Estimator, n: int, batch: int, seed: int, desc: str) -> Draws:
    params = chain.parameters()
    rows, secs, mems = [], [], []
    for i in tqdm(range(n), desc=desc, leave=False):
        for p in params:
            p.grad = None
        prompts = [PROMPTS[(i * batch + b) % len(PROMPTS)] for b in range(batch)]
        ctx = chain.context(prompts)
        gen = torch.Generator("cpu").manual_seed(seed + i)
        with PeakMemory(chain.backend.device) as mem:
            start = time.perf_counter()
            est.accumulate(chain, ctx, gen)
            if chain.backend.device.type == "cuda":
                torch.cuda.synchronize()
            secs.append(time.perf_counter() - start)
        mems.append(mem.mb)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        rows.append(-g.detach().double().cpu())  # .grad holds -grad J
    for p in params:
        p.grad = None
    return Draws(torch.stack(rows), secs, mems)


def compare(d: Draws, ref: torch.Tensor, ref_se2: torch.Tensor, batch: int) -> dict:
    n = len(d.grads)
    mean = d.grads.mean(0)
    cov_trace = float(d.grads.var(0).sum()) if n > 1 else float("nan")
    se2 = d.grads.var(0) / n if n > 1 else torch.full_like(mean, float("nan"))
    noise2 = float((se2 + ref_se2).sum())
    diff2 = float(((mean - ref) ** 2).sum())
    bias2 = max(diff2 - noise2, 0.0)  # the part of ||mean - ref||^2 noise does not explain
    t = sum(d.seconds) / n
    ref_norm = float(ref.norm())
    cos = torch.nn.functional.cosine_similarity(d.grads, ref[None], dim=1)
    return {
        "bias_over_se": math.sqrt(diff2 / noise2) if noise2 > 0 else float("nan"),
        "variance": cov_trace * batch,
        "cosine": float(cos.mean()),
        "time_s": t,
        "mem_mb": max(d.memory_mb),
        "err_1s": math.sqrt(bias2 + cov_trace * t / 1.0) / ref_norm if ref_norm > 0 else float("nan"),
    }


def load_backend(model_dir: Path, device: str) -> BuiltinBackend:
    try:
        backend = BuiltinBackend.load(model_dir, device=device)
    except (FileNotFoundError, OSError) as err:
        print(f"warning: {err}; using a randomly initialised built-in model")
        backend = BuiltinBackend(builtin_model.new_model().to(device))
    backend.model.text_encoder.requires_grad_(False)
    return backend


def run(args: argparse.Namespace) -> dict:
    backend = load_backend(args.model, args.device)
    lora.add_lora(backend, rank=4, seed=0)
    reward = rewards.make_reward(args.reward, rewards.load_perception(device=args.device))
    chain = BackendChain(backend, reward, SamplerSettings(args.steps, 1.0, args.guidance))
    print(f"sigma schedule: {[round(float(s), 3) for s in chain.sigma[1:]]}")
    ref_draws = draw(chain, make_estimator("full-bp"), args.n_ref, args.batch, seed=10_000, desc="reference")
    ref = ref_draws.grads.mean(0)
    ref_se2 = ref_draws.grads.var(0) / args.n_ref
    print(f"reference: ||grad J|| = {float(ref.norm()):.4g}, its SE norm = {float(ref_se2.sum().sqrt()):.3g}"
          f" ({args.n_ref} x batch {args.batch} full-BP trajectories)")
    rows = []
    for label, name, settings in settings_grid(args.quick):
        est = make_estimator(name, **settings)
        d = draw(chain, est, args.n_est, args.batch, seed=20_000, desc=label)
        row = {"estimator": label, **compare(d, ref, ref_se2, args.batch)}
        if name == "rlr":
            row["tail_L"] = est.tail_length(chain)
        rows.append(row)
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "reference_norm": float(ref.norm()), "reference_se_norm": float(ref_se2.sum().sqrt()),
            "sigma": [float(s) for s in chain.sigma[1:]], "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run in about a minute")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--reward", default="fidelity")
    p.add_argument("--steps", type=int, default=20, help="sampling steps K")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-ref", type=int, default=64, help="full-BP batches averaged for the reference")
    p.add_argument("--n-est", type=int, default=16, help="batches drawn per estimator setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.guidance, args.batch, args.n_ref, args.n_est = 5, 1.0, 2, 4, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_table(result["rows"], ["estimator", "bias_over_se", "variance", "cosine", "time_s", "mem_mb", "err_1s"],
                title=f"estimators vs exact gradient (K={args.steps}, batch {args.batch}, {args.n_est} draws each)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
