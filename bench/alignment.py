"""Benchmark: alignment runs of RLR, DDPO, truncated BP and full BP under one budget.

    python -m bench.alignment [--quick] [--json OUT] [--plot OUT.png] [--model DIR] [--jobs N]

Every method starts from the same model (a fresh LoRA adapter on the built-in model), maximises
the same differentiable reward (default: perception-model fidelity of the prompt) on the same
training prompts with the same sample budget (``--rounds`` steps x ``--batch`` trajectories;
DDPO takes ``--inner-epochs`` optimiser steps per batch, as it does) and the same seeds.
Every ``--eval-every`` steps the current model draws a fixed evaluation set (held-out prompts,
fixed seeds) and is scored with the reward and with the perception model's prompt fidelity
(fraction of the prompt's attributes read back, leaving out any attribute the reward asks for
whatever the prompt says: a drop there is reward hacking). Reported per method: training reward
and the evaluation curves against samples drawn and against wall time, mean and spread over
seeds, and the alignment checks (samples RLR needs to reach DDPO's final reward, RLR's final reward
against truncated BP's, collapse after the best point, fidelity kept).
The method doc's expectation: DDPO rises slowly, truncated BP fast and then degrades, RLR keeps
improving.

Runs are independent: ``--jobs N`` runs N at once in separate processes (on a GPU, or two
1-thread runs on a 2-core CPU). With ``--cache`` every run's curve is saved at each evaluation
point, so an interrupted benchmark keeps what it measured; ``--from-cache`` summarises the cache
(partial runs included and counted) without training.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.common import print_table, save_json_atomic, write_json
from bench.estimators import load_backend
from rlr_core import rewards
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld.model import DEFAULT_MODEL_DIR
from rlr_core.training import EstimatorConfig, Progress, TrainConfig, TrainingDiverged, run_round

TRAIN_PROMPTS = ["a red circle", "a blue square on the left", "a large yellow triangle",
                 "a small green circle, black background", "a purple square in the center",
                 "an orange triangle, white background"]
EVAL_PROMPTS = ["a large blue circle on the right", "a small red triangle, navy background",
                "a yellow square", "a green square on the left, gray background"]

METHODS: dict[str, tuple[str, dict]] = {
    "rlr": ("rlr", {"block": 2, "rest": "lr"}),  # the default tail (L = 3 at K = 10) and baseline ("state")
    # the leave-one-out baseline: what "rlr" was in the results measured before "state" became the default
    "rlr-loo": ("rlr", {"block": 2, "rest": "lr", "baseline": "loo"}),
    "rlr-L1": ("rlr", {"block": 2, "rest": "lr", "tail": 1}),  # the paper's one-step FO tail
    "ddpo": ("ddpo", {"inner_epochs": 4, "clip_range": 1e-4}),
    "truncated-bp": ("truncated-bp", {"steps": 1}),
    "full-bp": ("full-bp", {}),
}

Curve = list[dict]


def evaluate(backend, reward_fn, judge, settings: SamplerSettings, n_seeds: int, ignore: set[str],
             eval_prompts: list[str] = EVAL_PROMPTS) -> dict:
    images = torch.cat([generate(backend, eval_prompts, settings, seed=1000 + s) for s in range(n_seeds)])
    prompts = eval_prompts * n_seeds  # seed-major, as generated
    with torch.no_grad():
        reward = reward_fn(images.to(backend.device), prompts)
    fidelity = rewards.fidelity_accuracy(judge, images, prompts, ignore=ignore)
    return {"eval_reward": float(reward.mean()), "eval_fidelity": float(fidelity.mean())}


def run_key(args: argparse.Namespace) -> dict:
    """The settings a cached run must match to be reused."""
    skip = {"json", "plot", "cache", "methods", "seeds", "first_seed", "threads", "quick", "jobs", "from_cache"}
    return {k: str(v) for k, v in sorted(vars(args).items()) if k not in skip}


def cache_path(args: argparse.Namespace, method: str, seed: int) -> Path | None:
    return args.cache / f"{method}-seed{seed}.json" if args.cache else None


def save_curve(path: Path | None, args: argparse.Namespace, curve: Curve, complete: bool) -> None:
    if path is None:
        return
    save_json_atomic(path, {"settings": run_key(args), "complete": complete, "curve": curve})


def load_curve(path: Path | None, args: argparse.Namespace) -> tuple[Curve, bool] | None:
    """(curve, complete) of a cached run with these settings, else None."""
    if path is None or not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["settings"] != run_key(args):
        return None
    return saved["curve"], saved.get("complete", True)


def load_judge(args: argparse.Namespace):
    """The perception model that scores the runs (the clip one for clip runs: ``args.video``)."""
    if getattr(args, "video", False):
        return rewards.load_clip_perception(getattr(args, "judge", None), device=args.device)
    return rewards.load_perception(device=args.device)


def run_method(args: argparse.Namespace, method: str, seed: int, judge=None) -> Curve:
    """One training run from a fresh adapter; its curve is saved to the cache at every point.
    ``args`` may name other prompts (``train_prompts``, ``eval_prompts``) and ``video`` runs
    (bench.video_alignment)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    judge = judge if judge is not None else load_judge(args)
    name, options = METHODS[method]
    if name == "ddpo":
        options = {**options, "inner_epochs": args.inner_epochs}
    if name == "truncated-bp":
        options = {**options, "steps": args.truncate}
    if getattr(args, "video", False):
        from bench.video_alignment import load_clip_backend

        backend = load_clip_backend(args.model, args.device)
    else:
        backend = load_backend(args.model, args.device)
    reward_fn = rewards.make_reward(args.reward, judge)
    eval_prompts = getattr(args, "eval_prompts", EVAL_PROMPTS)
    ignore = rewards.targeted_attributes(reward_fn)
    sampler = SamplerSettings(args.steps, 1.0, args.guidance)
    config = TrainConfig(estimator=EstimatorConfig(name, options), steps=args.rounds, batch=args.batch,
                         prompts=getattr(args, "train_prompts", TRAIN_PROMPTS), sampler=sampler, lr=args.lr, seed=seed,
                         lora_rank=args.lora_rank)
    path = cache_path(args, method, seed)
    curve: Curve = []
    eval_time = 0.0

    def point(step: int, samples: int, train_elapsed: float, train_reward: float | None) -> None:
        nonlocal eval_time
        start = time.perf_counter()
        ev = evaluate(backend, reward_fn, judge, sampler, args.eval_seeds, ignore, eval_prompts)
        eval_time += time.perf_counter() - start
        curve.append({"step": step, "samples": samples, "train_seconds": train_elapsed,
                      "train_reward": train_reward, **ev})
        save_curve(path, args, curve, complete=False)

    point(0, 0, 0.0, None)

    def progress(p: Progress) -> None:
        if p.step % args.eval_every == 0 or p.step == p.total:
            # Progress.elapsed includes earlier evaluations; the curve's time axis is training only.
            point(p.step, p.samples, p.elapsed - eval_time, p.reward_mean)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_round(backend, reward_fn, config, Path(tmp) / "version", progress=progress)
        except TrainingDiverged as err:  # a run that diverges is a result, not a crash of the benchmark
            curve[-1]["diverged"] = str(err)
    save_curve(path, args, curve, complete=True)
    print(f"{method} seed {seed}: {time.perf_counter() - start:.0f} s, final eval reward "
          f"{curve[-1]['eval_reward']:.3f}" + (" (diverged)" if "diverged" in curve[-1] else ""), flush=True)
    return curve


def run_all(args: argparse.Namespace) -> tuple[dict[str, list[Curve]], int]:
    """Every (method, seed) curve: cached ones reused, the rest trained (``--jobs`` at a time).

    With ``--from-cache`` nothing is trained and unfinished cached runs count as they stand.
    Returns the curves and how many of them are partial."""
    # seed-major: with fewer --jobs than runs, every method gets its first seeds early
    runs = [(m, s) for s in range(args.first_seed, args.first_seed + args.seeds) for m in args.methods]
    found = {run: load_curve(cache_path(args, *run), args) for run in runs}
    todo = [] if args.from_cache else [run for run in runs if not (found[run] and found[run][1])]
    if todo and args.jobs > 1:
        # spawn: each worker starts clean (CUDA cannot be forked) and loads its own models
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {run: pool.submit(run_method, args, *run) for run in todo}
            found.update({run: (f.result(), True) for run, f in futures.items()})
    elif todo:
        judge = load_judge(args)
        found.update({run: (run_method(args, *run, judge=judge), True) for run in todo})
    curves: dict[str, list[Curve]] = {m: [] for m in args.methods}
    partial = 0
    for (method, _), entry in found.items():
        if entry is not None and len(entry[0]) > 1:  # a run cut off before its first step shows nothing
            curves[method].append(entry[0])
            partial += not entry[1]
    return {m: c for m, c in curves.items() if c}, partial


def mean_curve(runs: list[Curve], key: str) -> tuple[list[float], list[float]]:
    """(samples, mean of ``key`` over seeds) at the points every run reached."""
    n = min(len(r) for r in runs)
    return ([statistics.mean(r[i]["samples"] for r in runs) for i in range(n)],
            [statistics.mean(r[i][key] for r in runs) for i in range(n)])


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def point_at(run: Curve, samples: int) -> dict:
    """The run's last evaluation point at or before ``samples``."""
    return [pt for pt in run if pt["samples"] <= samples][-1]


def summarise(curves: dict[str, list[Curve]]) -> list[dict]:
    """One row per method; "@N" columns compare every method at the same sample count N (the
    most that every run reached), which matters when runs were cut off at different points."""
    common = min(run[-1]["samples"] for runs in curves.values() for run in runs)
    rows = []
    for method, runs in curves.items():
        finals = [run[-1] for run in runs]
        best = [max(pt["eval_reward"] for pt in run) for run in runs]

        def ms(key: str, pts: list[dict]) -> str:
            return "{:.3f} +- {:.3f}".format(*mean_sd([pt[key] for pt in pts]))

        rows.append({"method": method, "seeds": len(runs), "samples": int(min(f["samples"] for f in finals)),
                     "start eval reward": ms("eval_reward", [r[0] for r in runs]),
                     "final eval reward": ms("eval_reward", finals), "best eval reward": f"{statistics.mean(best):.3f}",
                     "start fidelity": ms("eval_fidelity", [r[0] for r in runs]),
                     "final fidelity": ms("eval_fidelity", finals),
                     f"eval reward @{common}": ms("eval_reward", [point_at(r, common) for r in runs]),
                     f"fidelity @{common}": ms("eval_fidelity", [point_at(r, common) for r in runs]),
                     "final train reward": ms("train_reward", finals),
                     "train seconds": f"{statistics.mean(f['train_seconds'] for f in finals):.0f}",
                     "diverged runs": sum("diverged" in f for f in finals)})
    return rows


def issue_targets(curves: dict[str, list[Curve]], fidelity_drop: float = 0.05) -> list[dict]:
    """The alignment checks for every RLR variant run, and each method's collapse and fidelity."""
    finals = {m: [r[-1]["eval_reward"] for r in runs] for m, runs in curves.items()}
    out = [check for rlr in curves if rlr.startswith("rlr") for check in rlr_targets(curves, finals, rlr)]
    for method, runs in curves.items():
        best = [max(pt["eval_reward"] for pt in r) for r in runs]
        drops = [b - f for b, f in zip(best, finals[method])]
        gain = statistics.mean(b - r[0]["eval_reward"] for b, r in zip(best, runs))
        mean_drop, sd = mean_sd(drops)
        out.append({"check": f"{method}: no collapse (final gives back <= 10% of the gain, or within 2 SE)",
                    "value": f"best - final = {mean_drop:.3f} +- {sd:.3f} of a gain of {gain:.3f}",
                    "met": mean_drop <= max(2 * sd / len(drops) ** 0.5, 0.1 * gain)})
        fid = [r[0]["eval_fidelity"] - r[-1]["eval_fidelity"] for r in runs]
        out.append({"check": f"{method}: fidelity holds (drop <= {fidelity_drop})",
                    "value": f"{statistics.mean(r[0]['eval_fidelity'] for r in runs):.3f} -> "
                             f"{statistics.mean(r[-1]['eval_fidelity'] for r in runs):.3f}",
                    "met": statistics.mean(fid) <= fidelity_drop})
    return out


def rlr_targets(curves: dict[str, list[Curve]], finals: dict[str, list[float]], rlr: str) -> list[dict]:
    """The alignment checks, judged on the mean curves over seeds.

    - RLR reaches DDPO's final eval reward with at most a quarter of DDPO's samples;
    - RLR ends at or above truncated BP (within two standard errors of the difference), compared
      at the most samples both reached;
    - no collapse: a method's final eval reward gives back at most 10% of its gain (best point
      minus start), or stays within two standard errors of its best point;
    - fidelity holds: final prompt fidelity at most ``fidelity_drop`` below the start."""
    out: list[dict] = []
    if "ddpo" in curves:
        target = statistics.mean(finals["ddpo"])
        ddpo_samples = min(r[-1]["samples"] for r in curves["ddpo"])
        ddpo_gain = target - statistics.mean(r[0]["eval_reward"] for r in curves["ddpo"])
        xs, ys = mean_curve(curves[rlr], "eval_reward")
        reached = next((x for x, y in zip(xs, ys) if x > 0 and y >= target), None)
        value = "not reached" if reached is None else f"{reached:.0f} samples ({reached / ddpo_samples:.2f}x)"
        if ddpo_gain <= 0:  # reaching a DDPO that did not improve says nothing
            reached, value = None, f"DDPO did not improve ({ddpo_gain:+.3f})"
        out.append({"check": f"{rlr} reaches DDPO's final eval reward ({target:.3f} at {ddpo_samples} samples) "
                             "with <= 1/4 of its samples",
                    "value": value, "met": reached is not None and reached <= ddpo_samples / 4})
    if "truncated-bp" in curves:  # at the same sample count: runs may have been cut off at different points
        n = min(r[-1]["samples"] for r in curves[rlr] + curves["truncated-bp"])
        ours = [point_at(r, n)["eval_reward"] for r in curves[rlr]]
        theirs = [point_at(r, n)["eval_reward"] for r in curves["truncated-bp"]]
        (a, sa), (b, sb) = mean_sd(ours), mean_sd(theirs)
        se = (sa**2 / len(ours) + sb**2 / len(theirs)) ** 0.5
        out.append({"check": f"{rlr} eval reward >= truncated BP's at {n} samples (within 2 SE)",
                    "value": f"{a:.3f} vs {b:.3f} (SE of difference {se:.3f})", "met": a >= b - 2 * se})
    return out


def plot(curves: dict[str, list[Curve]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("samples", "eval_reward", "eval reward vs samples"),
              ("train_seconds", "eval_reward", "eval reward vs training wall time (s)"),
              ("samples", "eval_fidelity", "prompt fidelity (perception) vs samples")]
    for ax, (x_key, y_key, label) in zip(axes, panels):
        for method, runs in curves.items():
            n = min(len(r) for r in runs)
            xs = np.array([[pt[x_key] for pt in r[:n]] for r in runs]).mean(0)
            ys = np.array([[pt[y_key] for pt in r[:n]] for r in runs])
            mean, sd = ys.mean(0), ys.std(0)
            ax.plot(xs, mean, label=method, marker="o", ms=3)
            ax.fill_between(xs, mean - sd, mean + sd, alpha=0.2)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run in a couple of minutes")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--reward", default="fidelity")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--rounds", type=int, default=40, help="training steps (sample batches) per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="sampling steps K")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--inner-epochs", type=int, default=4, help="DDPO optimiser steps per batch")
    p.add_argument("--truncate", type=int, default=1, help="truncated BP: K'")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-seeds", type=int, default=2, help="images per evaluation prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep each run's curve here (JSON, saved at every point); a rerun resumes")
    p.add_argument("--from-cache", action="store_true",
                   help="train nothing: summarise the cached runs for these settings, unfinished ones included")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.batch, args.steps, args.guidance = 2, 2, 2, 4, 1.0
        args.eval_every, args.eval_seeds, args.inner_epochs = 1, 1, 2
    if args.from_cache and not args.cache:
        p.error("--from-cache needs --cache")
    if args.threads and args.jobs == 1:
        torch.set_num_threads(args.threads)
    curves, partial = run_all(args)
    if not curves:
        raise SystemExit("no runs to summarise")
    rows = summarise(curves)
    targets = issue_targets(curves)
    title = (f"alignment: reward {args.reward}, {args.rounds} steps x batch {args.batch}, K={args.steps}, "
             f"lr {args.lr:g}, {args.seeds} seeds" + (f" ({partial} runs unfinished)" if partial else ""))
    print_table(rows, list(rows[0]), title=title)
    if targets:
        print_table(targets, ["check", "value", "met"], title="alignment checks")
    if args.plot:
        plot(curves, args.plot, title)
    write_json(args.json, {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "partial_runs": partial, "summary": rows, "targets": targets, "curves": curves})


if __name__ == "__main__":
    main()
