"""Benchmark: gradient estimators against the exact gradient on the built-in model.

    python -m bench.estimators [--quick] [--json OUT] [--cache DIR] [--model DIR] [--device cuda]

Setting: the built-in model with a fresh LoRA adapter (rank 4, as a first training round
starts), a fixed differentiable reward (a perception-model score), fixed prompts, and the
app's training sampler (K = 10 steps, eta 1, no guidance). The reference gradient is the mean
of ``--n-ref`` full-backprop gradients (exact per trajectory, so their mean is the truth up to
its own reported standard error).

Paired draws (common random numbers): estimate i of every setting starts from the generator
seed of reference draw i, and every estimator except ZO-RLR then samples exactly the reference's
trajectories (checked: their rewards must match). The bias of such a setting is measured on the
per-trajectory differences d_i = estimate_i - full-BP_i, whose spread excludes what the two
share (the sampling noise of the trajectories themselves). ZO-RLR samples its own perturbed
trajectories and is compared unpaired, with both means' standard errors.

    bias/SE     ||mean d|| / ||SE(mean d)||: about 1 when unbiased; grows like sqrt(n) when biased
    bias_n      estimated ||bias|| = sqrt(max(||mean d||^2 - ||SE||^2, 0)) from the first n/4, n/2
                and n draws: shrinks toward 0 when unbiased, stays put when biased
    variance    trace of the per-sample covariance (batch x covariance of batch estimates)
    cosine      mean cosine similarity of one batch's estimate to the reference
    time_s      wall time per estimate;  mem_mb  peak memory per estimate above the baseline
    err_1s      relative error of the average of the estimates one second of compute buys:
                sqrt(bias^2 + tr Cov_batch * time_s / 1 s) / ||ref||  (lower is better;
                the equal-compute comparison the method doc asks for)

Draws are cached per setting in ``--cache`` (safetensors), so an interrupted run resumes
where it stopped and a rerun with a larger ``--n-ref`` only draws the new ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from bench.common import print_table, write_json
from bench.estimator_targets import DEFAULT_ROW, issue_targets
from rlr_core import rewards
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.estimators import Estimator, make_estimator
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld.model import DEFAULT_MODEL_DIR
from rlr_core.training import lora

PROMPTS = ["a large red circle on the left, black background", "a small blue square in the center",
           "a yellow triangle on the right, navy background", "a large green circle, white background"]


def settings_grid(quick: bool) -> list[tuple[str, str, dict]]:
    """(label, estimator, settings) rows."""
    # truncated BP through h+1 steps is RLR's memory yardstick (method doc section 3)
    rows = [("full-bp", "full-bp", {}), *[(f"truncated-bp K'={k}", "truncated-bp", {"steps": k})
                                          for k in ((1, 2) if quick else (1, 2, 3, 5))],
            ("lr (=ddpo step 1)", "lr", {})]
    # Every RLR label names its FO tail L: L=1 is the paper's, L=3 the default at K = 10.
    if quick:
        rows += [(f"rlr h={h} rest={rest} L=1", "rlr", {"block": h, "rest": rest, "tail": 1})
                 for rest in ("lr", "zo", "none") for h in (1, 2)]
    else:  # h over the lr rest; every rest-of-chain option at the paper's h = 2 (CPU budget: ~5 min a row)
        rows += [(f"rlr h={h} rest=lr L=1", "rlr", {"block": h, "rest": "lr", "tail": 1}) for h in (1, 2, 4)]
        rows += [(f"rlr h=2 rest={rest} L=1", "rlr", {"block": 2, "rest": rest, "tail": 1}) for rest in ("zo", "none")]
        # a longer FO tail: the likelihood ratios at the smallest sigmas carry most of LR's variance
        rows += [(f"rlr h=2 rest=lr L={tail}", "rlr", {"block": 2, "rest": "lr", "tail": tail}) for tail in (2, 3)]
    rows.append(("rlr h=2 rest=lr m=4 L=1", "rlr", {"block": 2, "rest": "lr", "rest_steps": 4, "tail": 1}))
    if not quick:  # state-dependent baselines (rlr_core/estimators/baselines.py) against the leave-one-out mean
        rows += [(f"lr baseline={b}", "lr", {"baseline": b}) for b in ("state", "state+loo")]
        rows += [(f"rlr h=2 rest=lr L={tail} baseline={b}", "rlr",
                  {"block": 2, "rest": "lr", "tail": tail, "baseline": b})
                 for tail in (1, 3) for b in ("state", "state+loo")]
        # branching at the HO block (M continuations of its last step), alone and with the state baseline
        rows += [(f"rlr h=2 rest=lr L=3 branches=4{tag}", "rlr",
                  {"block": 2, "rest": "lr", "tail": 3, "branches": 4, "baseline": b})
                 for tag, b in (("", "loo"), (" baseline=state+loo", "state+loo"))]
    # unbiased variance reduction (docs/method.md section 2): the Taylor control variate and prompt
    # groups sharing x_K, alone and with the state baseline and branching; the authors' recipe
    # (BIASED) as a row of its own. K = 10 and batch 4: groups of 4 are one prompt per batch.
    rows += [(f"rlr h=2 rest=lr L=3 baseline={b}{tag}", "rlr",
              {"block": 2, "rest": "lr", "tail": 3, "baseline": b, **opts})
             for b in ("loo", "state")
             for tag, opts in ((" cv=taylor", {"control_variate": "taylor"}), (" groups=4", {"group_size": 4}),
                               (" cv=taylor groups=4", {"control_variate": "taylor", "group_size": 4}))]
    rows += [("rlr h=2 rest=lr L=3 branches=4 baseline=state cv=taylor", "rlr",
              {"block": 2, "rest": "lr", "tail": 3, "branches": 4, "baseline": "state", "control_variate": "taylor"}),
             ("lr baseline=state cv=taylor", "lr", {"baseline": "state", "control_variate": "taylor"}),
             (AUTHORS_ROW, "authors-code", {})]
    # the paper's memory accounting: every kept step holds its graph (no checkpointing)
    rows += [("truncated-bp K'=3 no-ckpt", "truncated-bp", {"steps": 3, "use_checkpoint": False}),
             ("rlr h=2 rest=lr L=3 no-ckpt", "rlr", {"block": 2, "rest": "lr", "tail": 3, "use_checkpoint": False})]
    # RLR rows that name no baseline are the leave-one-out ones (as measured before "state" became
    # the default), and rows that name no control variate or groups have none, so a label keeps its
    # meaning across runs and caches whatever the defaults become
    pinned = {"baseline": "loo", "control_variate": "none", "group_size": 1}
    return [(label, name, {**pinned, **opts} if name == "rlr" else opts) for label, name, opts in rows]


# The row measured with the current default RLR's settings (K = 10: L = 3 from the sigma schedule).
# The authors' recipe's estimator on this benchmark's chain (eta 1: its eta 0.05 changes the
# objective itself, which an exact-gradient benchmark at eta 1 cannot measure). BIASED.
AUTHORS_ROW = "authors-code (BIASED; eta 1 chain)"
# Options added after caches were written: left out of a draw's tag at their neutral value, so
# older caches of the same settings stay valid.
LATER_OPTIONS = {"branches": 1, "control_variate": "none", "group_size": 1, "kl_coef": 0.0}


def settings_repr(est: Estimator) -> str:
    """The estimator's dataclass repr without the later options at their neutral values."""
    kept = [f"{f.name}={getattr(est, f.name)!r}" for f in dataclasses.fields(est) if f.repr
            and not (f.name in LATER_OPTIONS and getattr(est, f.name) == LATER_OPTIONS[f.name])]
    return f"{type(est).__qualname__}({', '.join(kept)})"


def return_freed_memory_to_the_os() -> None:
    """Make glibc serve every allocation of 64 KiB or more with its own mmap, freed on release.

    By default glibc raises that threshold as a process frees large blocks, and later tensors
    then come from its heap, which it keeps: RSS stops tracking what is live and a peak above
    an earlier peak goes unseen. A fixed threshold (mallopt M_MMAP_THRESHOLD) keeps RSS honest."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 64 * 1024)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: the RSS peaks may then undercount


class PeakMemory:
    """Peak memory of a block of code above what was in use when it started, in MB.

    CUDA: the allocator's peak. CPU (Linux): the process's peak RSS (VmHWM), reset on entry
    through /proc/self/clear_refs, with large blocks returned to the OS as soon as they are
    freed (see :func:`return_freed_memory_to_the_os`); elsewhere 0 (not measured)."""

    _cpu_ready = False

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        if device.type == "cpu" and not PeakMemory._cpu_ready:
            return_freed_memory_to_the_os()
            PeakMemory._cpu_ready = True

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
    rewards: torch.Tensor  # (n, batch): each trajectory's reward (pairing check)

    def first(self, n: int) -> Draws:
        return Draws(self.grads[:n], self.seconds[:n], self.memory_mb[:n], self.rewards[:n])

    def save(self, path: Path, tag: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"grads": self.grads.contiguous(), "seconds": torch.tensor(self.seconds, dtype=torch.float64),
                   "memory_mb": torch.tensor(self.memory_mb, dtype=torch.float64),
                   "rewards": self.rewards.contiguous()}, str(tmp), metadata={"drawn_with": tag})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, tag: str) -> Draws | None:
        """The cached draws, if they were made with exactly this setting (``tag``)."""
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as f:
            found = (f.metadata() or {}).get("drawn_with")
        if found != tag:
            raise ValueError(f"{path} was drawn with another setting ({found}), not {tag}; "
                             "delete it or use another --cache")
        t = load_file(str(path))
        return cls(t["grads"], t["seconds"].tolist(), t["memory_mb"].tolist(), t["rewards"])

    @classmethod
    def concat(cls, a: Draws | None, b: Draws) -> Draws:
        if a is None or len(a.grads) == 0:
            return b
        return cls(torch.cat([a.grads, b.grads]), a.seconds + b.seconds, a.memory_mb + b.memory_mb,
                   torch.cat([a.rewards, b.rewards]))


def draw_tag(chain: BackendChain, est: Estimator, batch: int, seed: int, reward: str) -> str:
    """What a cache of draws must have been made with: estimator settings, reward, sampler,
    batch, seeds and the model's weights."""
    weights = hashlib.sha256()
    for p in chain.backend.denoiser.parameters():
        weights.update(p.detach().float().cpu().numpy().tobytes())
    return json.dumps({"estimator": settings_repr(est), "reward": reward, "sampler": repr(chain.settings),
                       "batch": batch, "seed": seed, "model": weights.hexdigest()[:16]})


def draw(chain: BackendChain, est: Estimator, n: int, batch: int, seed: int, desc: str,
         cache: Path | None = None, save_every: int = 1, reward: str = "") -> Draws:
    """``n`` estimates, draw i from generator seed ``seed + i``; resumes from ``cache`` (which
    must have been drawn with the same setting: see :func:`draw_tag`)."""
    tag = draw_tag(chain, est, batch, seed, reward) if cache else ""
    done = Draws.load(cache, tag) if cache else None
    if done is not None and len(done.grads) >= n:
        return done.first(n)
    params = chain.parameters()
    rows, secs, mems, rewards = [], [], [], []
    start_i = len(done.grads) if done is not None else 0

    def so_far() -> Draws:
        new = Draws(torch.stack(rows) if rows else torch.zeros(0), secs, mems,
                    torch.stack(rewards) if rewards else torch.zeros(0))
        return Draws.concat(done, new) if rows else done

    for i in tqdm(range(start_i, n), desc=desc, leave=False, initial=start_i, total=n):
        for p in params:
            p.grad = None
        prompts = [PROMPTS[(i * batch + b) % len(PROMPTS)] for b in range(batch)]
        ctx = chain.context(prompts)
        gen = torch.Generator("cpu").manual_seed(seed + i)
        with PeakMemory(chain.backend.device) as mem:
            start = time.perf_counter()
            result = est.accumulate(chain, ctx, gen)
            if chain.backend.device.type == "cuda":
                torch.cuda.synchronize()
            secs.append(time.perf_counter() - start)
        mems.append(mem.mb)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        rows.append(-g.detach().float().cpu())  # .grad holds -grad J
        rewards.append(result.rewards.detach().float().cpu())
        if cache and len(rows) % save_every == 0:
            so_far().save(cache, tag)
    for p in params:
        p.grad = None
    out = so_far()
    if cache:
        out.save(cache, tag)
    return out


def is_paired(d: Draws, ref: Draws) -> bool:
    """Did draw i sample the reference's trajectories i (equal rewards, up to float noise)?"""
    n = len(d.rewards)
    return n <= len(ref.rewards) and torch.allclose(d.rewards, ref.rewards[:n], rtol=1e-4, atol=1e-5)


def bias_norm(diff: torch.Tensor, se2: torch.Tensor) -> float:
    """||bias|| estimated from a mean difference: the part of ||diff||^2 its noise does not explain."""
    return math.sqrt(max(float((diff**2).sum() - se2.sum()), 0.0))


def compare(d: Draws, ref: Draws, batch: int) -> dict:
    n = len(d.grads)
    G, R = d.grads.double(), ref.grads.double()
    ref_mean = R.mean(0)
    paired = is_paired(d, ref)

    def mean_diff(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean difference to the reference, its squared SE per coordinate) from the first m draws."""
        if paired:
            dd = G[:m] - R[:m]
            return dd.mean(0), dd.var(0) / m
        return G[:m].mean(0) - ref_mean, G[:m].var(0) / m + R.var(0) / len(R)

    diff, se2 = mean_diff(n)
    cov_trace = float(G.var(0).sum())
    t = sum(d.seconds) / n
    ref_norm = float(ref_mean.norm())
    cos = torch.nn.functional.cosine_similarity(G, ref_mean[None], dim=1)
    by_n = {m: bias_norm(*mean_diff(m)) for m in sorted({max(n // 4, 2), max(n // 2, 2), n})}
    return {
        "paired": paired,
        "bias_over_se": float(diff.norm() / se2.sum().sqrt()),
        "bias_n": "/".join(f"{v:.3g}" for v in by_n.values()),
        "variance": cov_trace * batch,
        "cosine": float(cos.mean()),
        "time_s": t,
        "mem_mb": max(d.memory_mb),
        "err_1s": math.sqrt(bias_norm(diff, se2) ** 2 + cov_trace * t / 1.0) / ref_norm,
        "bias_norm_by_n": by_n,
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
    cache = (lambda label: args.cache / f"{label.replace(' ', '_')}.safetensors") if args.cache else (
        lambda label: None)
    ref_draws = draw(chain, make_estimator("full-bp"), args.n_ref, args.batch, seed=10_000, desc="reference",
                     cache=cache("full-bp"), reward=args.reward)
    ref = ref_draws.grads.double().mean(0)
    ref_se2 = ref_draws.grads.double().var(0) / args.n_ref
    print(f"reference: ||grad J|| = {float(ref.norm()):.4g}, its SE norm = {float(ref_se2.sum().sqrt()):.3g}"
          f" ({args.n_ref} x batch {args.batch} full-BP trajectories)")
    rows = []
    for label, name, settings in settings_grid(args.quick):
        if args.rows and label not in args.rows:
            continue
        est = make_estimator(name, **settings)
        if name == "full-bp":  # its own reference: a second, independent set of draws
            d = draw(chain, est, args.n_est, args.batch, seed=20_000, desc=label, cache=cache("full-bp-2"),
                     reward=args.reward)
        else:
            d = draw(chain, est, args.n_est, args.batch, seed=10_000, desc=label, cache=cache(label),
                     reward=args.reward)
        row = {"estimator": label, **compare(d, ref_draws, args.batch)}
        if name == "rlr":
            row["tail_L"] = est.tail_length(chain)
        rows.append(row)
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "reference_norm": float(ref.norm()), "reference_se_norm": float(ref_se2.sum().sqrt()),
            "sigma": [float(s) for s in chain.sigma[1:]], "default_row": DEFAULT_ROW, "rows": rows,
            "targets": issue_targets(rows, reward=args.reward)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run in about a minute")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--reward", default="fidelity")
    p.add_argument("--steps", type=int, default=10, help="sampling steps K (the app trains with 10)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (the app trains without: 1)")
    p.add_argument("--cache", type=Path, default=None, help="keep every draw here; a rerun resumes from it")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-ref", type=int, default=64, help="full-BP batches averaged for the reference")
    p.add_argument("--n-est", type=int, default=16, help="batches drawn per estimator setting")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rows", nargs="+", default=None, metavar="LABEL",
                   help="run only these rows of the grid (labels as printed, e.g. \"truncated-bp K'=1\")")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.guidance, args.batch, args.n_ref, args.n_est = 5, 1.0, 2, 4, 3
    if args.n_est > args.n_ref:
        p.error("--n-est must not exceed --n-ref: estimate i is paired with reference draw i")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_table(result["rows"], ["estimator", "paired", "bias_over_se", "bias_n", "variance", "cosine", "time_s",
                                 "mem_mb", "err_1s"],
                title=f"estimators vs exact gradient (K={args.steps}, batch {args.batch}, {args.n_est} draws each)")
    print_table(result["targets"], ["check", "value", "met"], title="targets")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
