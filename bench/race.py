"""Benchmark: a tuned race on a composition reward, judged from the pixels.

    python -m bench.race [--quick] [--reward prefer-small] [--cache DIR] [--json OUT] [--plot OUT.png]

Every arm starts from the built-in model with a fresh LoRA adapter and maximises the same
composition reward (perception-model log p(size = small | image) by default; see
``rlr_core.rewards.COMPOSITION``) under the same sample budget. Success is judged three ways at
every evaluation point, on held-out prompts with fixed seeds:

- ``pixel``: the fraction of images that the pixel judge (``rlr_core.shapesworld.pixel_judge``,
  no network) reads as the preferred value; an image whose shape was erased counts as a miss;
- ``fidelity``: perception-model prompt fidelity on the attributes the reward does NOT target;
- ``quality``: image quality from pixels (background noise, edge sharpness against renders).

The race has two phases with one budget per run: a learning-rate sweep (one seed, ``--lrs``,
the same for every arm), then ``--seeds`` seeds of every arm at its best swept rate (the highest
final pixel score among the rates that keep non-targeted fidelity within 0.15 of the start).
Arms the installed estimators cannot run (an option they reject, a preset that is missing) are
skipped with the reason. Every run is
cached as JSON (``--cache``) at every evaluation point, so a cut-off race resumes where it stood.
The summary, the targets and the plot: :mod:`bench.race_report`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench import race_report
from bench.alignment import EVAL_PROMPTS, TRAIN_PROMPTS
from bench.common import save_json_atomic, write_json
from bench.estimators import load_backend
from rlr_core import dcot, rewards
from rlr_core.estimators import make_estimator
from rlr_core.sampler import SamplerSettings, generate, sample_prompts
from rlr_core.shapesworld import pixel_judge
from rlr_core.shapesworld.model import DEFAULT_MODEL_DIR
from rlr_core.training import EstimatorConfig, Progress, TrainConfig, TrainingDiverged, run_round

RLR = {"block": 2, "rest": "lr"}
# arm -> (estimator, options, DCoT stage prompts on?). "window" is filled in from the chain length.
ARMS: dict[str, tuple[str, dict, bool]] = {
    "rlr": ("rlr", RLR, False),  # the default RLR
    "truncated-bp": ("truncated-bp", {"steps": 1}, False),
    "ddpo": ("ddpo", {"inner_epochs": 4, "clip_range": 1e-4}, False),
    "full-bp": ("full-bp", {}, False),
    "lr": ("lr", {}, False),
    "rlr-kl": ("rlr", {**RLR, "kl_coef": None}, False),  # kl_coef from --kl-coef
    "rlr-dcot": ("rlr", {**RLR, "window": "coarse"}, True),  # block in the coarse stage + stage prompts
    "rlr-window": ("rlr", {**RLR, "window": "coarse"}, False),  # the coarse-stage block alone, plain prompts
    "authors": ("preset:authors-code", {}, False),
}
# Arms compared with RLR at RLR's learning rate (the with/without comparison is then about the
# option alone), so they are not swept.
LR_FROM = {"rlr-kl": "rlr", "rlr-dcot": "rlr", "rlr-window": "rlr"}

Curve = list[dict]
JUDGE_VERSION = "2"  # 2: a speck under pixel_judge.MIN_AREA is no shape


def authors_preset() -> tuple[str, dict, float]:
    """(estimator, options, sampler eta) of the authors' released recipe (rlr_core/training/presets.py)."""
    from rlr_core.training.presets import PRESETS

    preset = PRESETS["authors-code"]
    return preset.estimator.name, dict(preset.estimator.options), preset.eta


def resolve(arm: str, args: argparse.Namespace) -> tuple[str, dict, bool, float] | str:
    """(estimator, options, staged, eta) that the arm runs, or the reason it cannot run here."""
    name, options, staged = ARMS[arm]
    options, eta = dict(options), 1.0
    if name.startswith("preset:"):
        name, options, eta = authors_preset()
    if "kl_coef" in options:
        options["kl_coef"] = args.kl_coef
    if options.get("window") == "coarse":
        options["window"] = dcot.stage_window("coarse", args.steps)
    if name == "ddpo":
        options["inner_epochs"] = args.inner_epochs
    try:
        make_estimator(name, **options)
    except (TypeError, ValueError) as err:  # an option this checkout's estimator does not know
        return f"estimator {name!r} rejects {options}: {err}"
    return name, options, staged, eta


def stage_prompts(prompts: list[str]) -> dict[str, list[str]]:
    return {p: dcot.split_prompt(p).as_list() for p in prompts}


def draw_eval(backend, settings: SamplerSettings, n_seeds: int, staged: bool) -> tuple[torch.Tensor, list[str]]:
    """The evaluation set (seed-major); DCoT arms draw with their stage prompts, as the app does."""
    images = []
    for s in range(n_seeds):
        if staged:
            per_prompt = [dcot.step_prompts(dcot.split_prompt(p), settings.steps) for p in EVAL_PROMPTS]
            per_step = [[sched[i] for sched in per_prompt] for i in range(settings.steps)]
            images.append(sample_prompts(backend, per_step, settings, 1000 + s)[0].cpu())
        else:
            images.append(generate(backend, EVAL_PROMPTS, settings, seed=1000 + s))
    return torch.cat(images), EVAL_PROMPTS * n_seeds


def evaluate(backend, reward_fn, judge, settings: SamplerSettings, n_seeds: int, staged: bool,
             preferred: tuple[str, str]) -> dict:
    images, prompts = draw_eval(backend, settings, n_seeds, staged)
    with torch.no_grad():
        reward = reward_fn(images.to(backend.device), prompts)
    ignore = rewards.targeted_attributes(reward_fn)
    fidelity = rewards.fidelity_accuracy(judge, images, prompts, ignore=ignore)
    readings = pixel_judge.read(images)
    q = pixel_judge.quality(images, prompts)
    attribute, value = preferred
    return {"eval_reward": float(reward.mean()), "pixel": pixel_judge.agreement(readings, attribute, value),
            "fidelity": float(fidelity.mean()), "quality": float(q["quality"].mean()),
            "noise": float(q["noise"].mean()), "sharpness": float(q["sharpness"].mean()),
            "area": float(sum(r.area for r in readings) / len(readings))}


def uses_kl(arm: str) -> bool:
    return "kl_coef" in ARMS[arm][1]


def run_key(args: argparse.Namespace, arm: str) -> dict:
    keep = ("reward", "rounds", "batch", "steps", "guidance", "lora_rank", "inner_epochs", "eval_every",
            "eval_seeds", "model")
    # the judge's version: a cached score is only reused if the same judge gave it; the KL
    # coefficient only where the arm uses it, so changing it reruns that arm alone
    key = {**{k: str(getattr(args, k)) for k in keep}, "judge": JUDGE_VERSION}
    return {**key, "kl_coef": str(args.kl_coef)} if uses_kl(arm) else key


def cache_path(args: argparse.Namespace, arm: str, lr: float, seed: int) -> Path | None:
    if not args.cache:
        return None
    label = f"{arm}{args.kl_coef:g}" if uses_kl(arm) else arm  # one file per coefficient
    return args.cache / f"{label}-lr{lr:g}-seed{seed}.json"


def load_run(path: Path | None, args: argparse.Namespace, arm: str) -> dict | None:
    if path is None or not path.exists():
        return None
    saved = json.loads(path.read_text())
    settings = dict(saved.get("settings", {}))
    if not uses_kl(arm):
        settings.pop("kl_coef", None)  # caches written before the key left it out for such arms
    return saved if settings == run_key(args, arm) else None


def save_run(path: Path | None, args: argparse.Namespace, arm: str, curve: Curve, complete: bool) -> None:
    if path is None:
        return
    save_json_atomic(path, {"settings": run_key(args, arm), "complete": complete, "curve": curve})


def run_one(args: argparse.Namespace, arm: str, lr: float, seed: int) -> Curve:
    """One training run from a fresh adapter; its curve goes to the cache at every point."""
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = resolve(arm, args)
    assert not isinstance(plan, str), plan
    name, options, staged, eta = plan
    judge = rewards.load_perception(device=args.device)
    backend = load_backend(args.model, args.device)
    reward_fn = rewards.make_reward(args.reward, judge)
    preferred = rewards.COMPOSITION[args.reward]
    sampler = SamplerSettings(args.steps, eta, args.guidance)
    config = TrainConfig(estimator=EstimatorConfig(name, options), steps=args.rounds, batch=args.batch,
                         prompts=TRAIN_PROMPTS, stage_prompts=stage_prompts(TRAIN_PROMPTS) if staged else None,
                         sampler=sampler, lr=lr, seed=seed, lora_rank=args.lora_rank)
    path = cache_path(args, arm, lr, seed)
    curve: Curve = []
    eval_time = 0.0

    def point(step: int, samples: int, train_elapsed: float, train_reward: float | None) -> None:
        nonlocal eval_time
        start = time.perf_counter()
        # the judge always samples at eta 1 so every arm is read on the same kind of draw
        ev = evaluate(backend, reward_fn, judge, SamplerSettings(args.steps, 1.0, args.guidance),
                      args.eval_seeds, staged, preferred)
        eval_time += time.perf_counter() - start
        curve.append({"step": step, "samples": samples, "train_seconds": train_elapsed,
                      "train_reward": train_reward, **ev})
        save_run(path, args, arm, curve, complete=False)

    point(0, 0, 0.0, None)
    eval_time = 0.0  # the start's evaluation ran before the round's clock started

    def progress(p: Progress) -> None:
        if p.step % args.eval_every == 0 or p.step == p.total:
            point(p.step, p.samples, p.elapsed - eval_time, p.reward_mean)  # time axis: training only

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_round(backend, reward_fn, config, Path(tmp) / "version", progress=progress)
        except TrainingDiverged as err:  # a diverged run is a result
            curve[-1]["diverged"] = str(err)
    save_run(path, args, arm, curve, complete=True)
    print(f"{arm} lr {lr:g} seed {seed}: {time.perf_counter() - start:.0f} s, pixel {curve[-1]['pixel']:.3f}, "
          f"fidelity {curve[-1]['fidelity']:.3f}, quality {curve[-1]['quality']:.3f}", flush=True)
    return curve


def run_many(args: argparse.Namespace, runs: list[tuple[str, float, int]]) -> dict[tuple[str, float, int], Curve]:
    """Curves of ``runs`` (arm, lr, seed): finished cached ones reused, the rest trained
    ``--jobs`` at a time; with ``--from-cache`` unfinished runs count as they stand."""
    found = {run: load_run(cache_path(args, *run), args, run[0]) for run in runs}
    todo = [] if args.from_cache else [r for r in runs if not (found[r] and found[r]["complete"])]
    out = {r: f["curve"] for r, f in found.items() if f and len(f["curve"]) > 1}
    if todo and args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {run: pool.submit(run_one, args, *run) for run in todo}
            out.update({run: f.result() for run, f in futures.items()})
    else:
        out.update({run: run_one(args, *run) for run in todo})
    return out


def best_lr(curves: dict[float, Curve], max_fidelity_drop: float = 0.15) -> float:
    """The swept rate with the highest final pixel score (mean of the last two points; ties
    broken by the final perception reward) among the rates that keep non-targeted fidelity within
    ``max_fidelity_drop`` of the start: the sweep should not reward hacking. If none does, all count."""
    def score(curve: Curve) -> tuple[float, float]:
        last = curve[-2:]
        return (sum(pt["pixel"] for pt in last) / len(last), curve[-1]["eval_reward"])

    kept = {lr: c for lr, c in curves.items() if c[0]["fidelity"] - c[-1]["fidelity"] <= max_fidelity_drop}
    pool = kept or curves
    return max(pool, key=lambda lr: score(pool[lr]))


def phase(args: argparse.Namespace, arms: list[str], n_seeds: int, known: dict[str, float]
          ) -> tuple[dict, dict[str, float], dict]:
    """Sweep ``arms`` (one seed each rate), pick each one's rate, then race ``n_seeds`` seeds
    (seed-major: a cut-off race still has every arm's first seeds). Arms in ``LR_FROM`` take the
    rate of their reference arm (from this group or ``known``) without a sweep."""
    if not arms:
        return {}, {}, {}
    swept = [a for a in arms if LR_FROM.get(a) not in arms and LR_FROM.get(a) not in known]
    sweep = run_many(args, [(a, lr, args.sweep_seed) for a in swept for lr in args.lrs])
    best = {a: best_lr({lr: sweep[(a, lr, args.sweep_seed)] for lr in args.lrs if (a, lr, args.sweep_seed) in sweep})
            for a in swept if any((a, lr, args.sweep_seed) in sweep for lr in args.lrs)}
    rates = {**known, **best}
    best.update({a: rates[LR_FROM[a]] for a in arms if a not in swept and LR_FROM.get(a) in rates})
    if args.sweep_only:
        return sweep, best, {}
    runs = [(a, best[a], s) for s in range(n_seeds) for a in arms if a in best]
    return sweep, best, run_many(args, runs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--reward", default="prefer-small", choices=sorted(rewards.COMPOSITION))
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="the swept learning rates")
    p.add_argument("--sweep-seed", type=int, default=100, help="the sweep's seed (not one of the race's)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--few-seeds", type=int, default=None,
                   help="seeds for the arms outside --all-seeds-arms (when the budget cannot fit all)")
    p.add_argument("--all-seeds-arms", nargs="+", default=["rlr", "truncated-bp", "ddpo"])
    p.add_argument("--rounds", type=int, default=12, help="training steps per run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="sampling steps K")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--inner-epochs", type=int, default=4, help="DDPO optimiser steps per batch")
    p.add_argument("--kl-coef", type=float, default=0.1, help="the rlr-kl arm's KL-to-base coefficient")
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--eval-seeds", type=int, default=4, help="images per evaluation prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--from-cache", action="store_true", help="train nothing: summarise the cache")
    p.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batch, args.steps, args.eval_every, args.eval_seeds = 2, 2, 6, 1, 1
        args.inner_epochs, args.seeds, args.lrs = 2, 2, [1e-2]
    if args.threads:
        torch.set_num_threads(args.threads)
    plans = {arm: resolve(arm, args) for arm in args.arms}
    skipped = {arm: why for arm, why in plans.items() if isinstance(why, str)}
    for arm, why in skipped.items():
        print(f"skipping arm {arm}: {why}", flush=True)
    arms = [a for a in args.arms if a not in skipped]
    # With --few-seeds, the arms that keep every seed go first (their sweep, then their race), so a
    # race cut short by the budget has what the targets need.
    first = [a for a in arms if args.few_seeds is None or a in args.all_seeds_arms]
    sweep: dict[tuple[str, float, int], Curve] = {}
    race: dict[tuple[str, float, int], Curve] = {}
    best: dict[str, float] = {}
    for group, n_seeds in ((first, args.seeds), ([a for a in arms if a not in first], args.few_seeds or 0)):
        group_sweep, group_best, group_race = phase(args, group, n_seeds, best)
        sweep.update(group_sweep)
        best.update(group_best)
        race.update(group_race)
    best = {a: best[a] for a in arms if a in best}  # the arms' order
    print("best learning rates:", best, flush=True)
    curves = {a: [race[r] for r in sorted(race) if r[0] == a] for a in best}
    curves = {a: c for a, c in curves.items() if c}
    report = race_report.report(args, sweep, best, curves, skipped)
    if args.plot and curves:
        race_report.plot(curves, args.plot, report["title"])
    elif args.plot and sweep:  # no race runs yet: show the sweep as it stands
        race_report.plot({f"{a} lr {lr:g}": [c] for (a, lr, _), c in sorted(sweep.items())}, args.plot,
                         report["title"] + ": the learning-rate sweep so far (one seed each)")
    write_json(args.json, {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           **report, "curves": curves})


if __name__ == "__main__":
    main()
