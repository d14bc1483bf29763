"""Benchmark: alignment runs of RLR, DDPO, truncated BP and full BP under one budget.

    python -m bench.alignment [--quick] [--json OUT] [--plot OUT.png] [--model DIR]

Every method starts from the same model (a fresh LoRA adapter on the built-in model), maximises
the same differentiable reward (default: perception-model fidelity of the prompt) on the same
training prompts with the same sample budget (``--rounds`` steps x ``--batch`` trajectories;
DDPO takes ``--inner-epochs`` optimiser steps per batch, as it does) and the same seeds.
Every ``--eval-every`` steps the current model draws a fixed evaluation set (held-out prompts,
fixed seeds) and is scored with the reward and with the perception model's prompt fidelity
(fraction of the prompt's attributes read back). Reported per method: training reward and the
evaluation curves against samples drawn and against wall time, mean and spread over seeds.
The method doc's expectation: DDPO rises slowly, truncated BP fast and then degrades, RLR keeps
improving.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_table, write_json
from bench.estimators import load_backend
from rlr_core import rewards
from rlr_core.builtin_model import DEFAULT_MODEL_DIR
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.training import Progress, TrainConfig, TrainingDiverged, run_round

TRAIN_PROMPTS = ["a red circle", "a blue square on the left", "a large yellow triangle",
                 "a small green circle, black background", "a purple square in the center",
                 "an orange triangle, white background"]
EVAL_PROMPTS = ["a large blue circle on the right", "a small red triangle, navy background",
                "a yellow square", "a green square on the left, gray background"]

METHODS: dict[str, tuple[str, dict]] = {
    "rlr": ("rlr", {"block": 2, "rest": "lr"}),  # the default tail (L = 3 at K = 10)
    "rlr-L1": ("rlr", {"block": 2, "rest": "lr", "tail": 1}),  # the paper's one-step FO tail
    "ddpo": ("ddpo", {"inner_epochs": 4, "clip_range": 1e-4}),
    "truncated-bp": ("truncated-bp", {"steps": 1}),
    "full-bp": ("full-bp", {}),
}


def evaluate(backend, reward_fn, judge, settings: SamplerSettings, n_seeds: int) -> dict:
    images = torch.cat([generate(backend, EVAL_PROMPTS, settings, seed=1000 + s) for s in range(n_seeds)])
    prompts = EVAL_PROMPTS * n_seeds  # seed-major, as generated
    with torch.no_grad():
        reward = reward_fn(images.to(backend.device), prompts)
    fidelity = rewards.fidelity_accuracy(judge, images, prompts)
    return {"eval_reward": float(reward.mean()), "eval_fidelity": float(fidelity.mean())}


def run_method(args: argparse.Namespace, method: str, seed: int, judge) -> list[dict]:
    name, options = METHODS[method]
    if name == "ddpo":
        options = {**options, "inner_epochs": args.inner_epochs}
    if name == "truncated-bp":
        options = {**options, "steps": args.truncate}
    backend = load_backend(args.model, args.device)
    reward_fn = rewards.make_reward(args.reward, judge)
    sampler = SamplerSettings(args.steps, 1.0, args.guidance)
    config = TrainConfig(estimator=name, estimator_options=options, steps=args.rounds, batch=args.batch,
                         prompts=TRAIN_PROMPTS, sampler=sampler, lr=args.lr, seed=seed,
                         lora_rank=args.lora_rank)
    curve: list[dict] = []
    eval_time = 0.0

    def point(step: int, samples: int, train_elapsed: float, train_reward: float | None) -> None:
        nonlocal eval_time
        start = time.perf_counter()
        ev = evaluate(backend, reward_fn, judge, sampler, args.eval_seeds)
        eval_time += time.perf_counter() - start
        curve.append({"step": step, "samples": samples, "train_seconds": train_elapsed,
                      "train_reward": train_reward, **ev})

    point(0, 0, 0.0, None)

    def progress(p: Progress) -> None:
        if p.step % args.eval_every == 0 or p.step == p.total:
            # Progress.elapsed includes earlier evaluations; the curve's time axis is training only.
            point(p.step, p.samples, p.elapsed - eval_time, p.reward_mean)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_round(backend, reward_fn, config, Path(tmp) / "version", progress=progress)
        except TrainingDiverged as err:  # a run that diverges is a result, not a crash of the benchmark
            curve[-1]["diverged"] = str(err)
    return curve


def run_key(args: argparse.Namespace) -> dict:
    """The settings a cached run must match to be reused."""
    skip = {"json", "plot", "cache", "methods", "seeds", "threads", "quick"}
    return {k: str(v) for k, v in sorted(vars(args).items()) if k not in skip}


def summarise(curves: dict[str, list[list[dict]]]) -> list[dict]:
    rows = []
    for method, runs in curves.items():
        finals = [run[-1] for run in runs]
        best = [max(pt["eval_reward"] for pt in run) for run in runs]

        def ms(key: str, pts: list[dict]) -> str:
            vals = [pt[key] for pt in pts]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} +- {sd:.3f}"

        rows.append({"method": method, "start eval reward": ms("eval_reward", [r[0] for r in runs]),
                     "final eval reward": ms("eval_reward", finals), "best eval reward": f"{statistics.mean(best):.3f}",
                     "final fidelity": ms("eval_fidelity", finals), "final train reward": ms("train_reward", finals),
                     "train seconds": f"{statistics.mean(f['train_seconds'] for f in finals):.0f}",
                     "diverged runs": sum("diverged" in f for f in finals)})
    return rows


def plot(curves: dict[str, list[list[dict]]], path: Path, title: str) -> None:
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
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None,
                   help="keep each finished run's curve here (JSON); a rerun with the same settings resumes")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.rounds, args.batch, args.steps, args.guidance = 2, 2, 2, 4, 1.0
        args.eval_every, args.eval_seeds, args.inner_epochs = 1, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    judge = rewards.load_perception(device=args.device)
    curves: dict[str, list[list[dict]]] = {}
    for method in args.methods:
        curves[method] = []
        for seed in range(args.seeds):
            cached = args.cache / f"{method}-seed{seed}.json" if args.cache else None
            saved = json.loads(cached.read_text()) if cached and cached.exists() else None
            if saved and saved["settings"] == run_key(args):
                curves[method].append(saved["curve"])
                continue
            start = time.perf_counter()
            curves[method].append(run_method(args, method, seed, judge))
            print(f"{method} seed {seed}: {time.perf_counter() - start:.0f} s, final eval reward "
                  f"{curves[method][-1][-1]['eval_reward']:.3f}"
                  + (" (diverged)" if "diverged" in curves[method][-1][-1] else ""))
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps({"settings": run_key(args), "curve": curves[method][-1]}))
    rows = summarise(curves)
    title = (f"alignment: reward {args.reward}, {args.rounds} steps x batch {args.batch}, K={args.steps}, "
             f"{args.seeds} seeds")
    print_table(rows, list(rows[0]), title=title)
    if args.plot:
        plot(curves, args.plot, title)
    write_json(args.json, {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "summary": rows, "curves": curves})


if __name__ == "__main__":
    main()
