"""The loop a person lives with, several rounds in a row: which round settings keep the prompt?

    python -m bench.loop --arms default tbp1 --tastes bold composition --seeds 0 1 2 --rounds 4 \\
        --jobs 2 --cache runs/loop --json bench/results/loop.json --plot bench/results/loop.png

Each run (an arm, a taste, a seed) serves the app in-process on a fresh data folder with the
built-in model and drives it over its HTTP API (``gradio_client``), as ``examples/api_loop.py``
does. A simulated rater (``rlr_core/shapesworld/raters.py``) plays the person:

- **bold** (colour and size): large, warm-coloured shapes on dark backgrounds;
- **composition** (position and size, settled in the earliest sampling steps): small shapes on
  the left.

Both ignore the prompt, so what the proxy learns from them pulls against prompts that ask for
something else; nothing they rate tells the proxy what the prompts ask for.

Before each round the rater rates 32 fresh samples (the 8 ``RATE_PROMPTS`` x 4) and answers
the 24 comparisons the app shows (blind before/after pairs of the last round first); then a
round runs with the app's default settings on the built-in model, overridden only by the arm.
After each round the active version and the round's new version (when the guard kept it
inactive) are measured in preview mode (nothing is stored, so measuring changes nothing the app
learns from), on fixed noise:

- **score**: the rater's latent utility on ``RATE_PROMPTS`` x 4 seeds x 2 images;
- **fidelity**: judged from the pixels alone (``rlr_core/shapesworld/pixel_judge.py``: kind,
  colour, size, position and background, with no network, independent of the perception model
  that the reward proxy, the rater and the app's guard look through), on those images
  (``fidelity_rated``: the short prompts the rater rates) and on as many of 8 fully specified
  held-out prompts (``HELD_OUT``, not the guard's; ``fidelity_held_out``), checked apart;
- **quality**: the pixel judge's image quality (sharpness and background noise against renders);
- the guard's verdict, blind wins against the parent, the round's wall time (the round starts
  once the app has drawn the guard's parent and base probes ahead, as it does while a person
  rates: ``app/guard_prefetch.py``; the wait is ``probes_ahead_wait_s``);
- to tell a misreading judge from probes that show something else: the guard's judge on the
  benchmark's own images (``guard_judge_fidelity``), the pixel judge's misses per attribute,
  and the guard's verdict redrawn on its own probe images and read by the pixel judge
  (``guard_on_pixels``, ``bench/guard_probes.py``).

Every finished run is cached (``--cache``, one JSON each); a rerun resumes, ``--from-cache``
only summarises. A run in progress keeps what it measured after every round (``.partial.json``),
which ``--partial`` summarises too (a run cut short by a time limit, as on a lent GPU:
``scripts/gpu_loop.sh``). Runs go to ``--jobs`` worker processes with ``--threads`` torch
threads each. The checks, table, markdown and plot are in ``bench/loop_report.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.common import print_table, save_json_atomic, write_json
from bench.loop_report import markdown, plot, summarise, versions_markdown

ROOT = Path(__file__).resolve().parent.parent

RATE_PROMPTS = ["a circle", "a square", "a triangle", "a shape on the left", "a small shape", "a blue shape",
                "a circle on a white background", "a triangle on the right"]
HELD_OUT = ["a large red square on the right", "a small yellow circle on the left, black background",
            "a green triangle on the right, white background", "a small blue square in the center, gray background",
            "a large purple triangle on the left", "an orange circle in the center, white background",
            "a small red triangle on the right, navy background", "a large blue circle on the left, gray background"]
# as many held-out images (8 prompts x 4 seeds x 2) as rated ones: a loss on the prompts nobody rates
# weighs as much as one on those they do
SCORE_SEEDS, FIDELITY_SEEDS, PER_SEED = [1001, 1002, 1003, 1004], [2001, 2002, 2003, 2004], 2
LOOP = {"rated_per_round": 32, "comparisons_per_round": 24, "sample_steps": 20, "guidance": 3.0}

# the regularisers of the round settings: the KL to the parent, the fidelity term, the in-round watch
# (twice in a 10-step round)
REGULARISED = {"kl_coef": 0.3, "fidelity_weight": 1.0, "fidelity_check_every": 5}
UNREGULARISED = {"kl_coef": 0.0, "fidelity_weight": 0.0, "fidelity_check_every": 0}
ESTIMATORS = {"rlr": {"estimator": "rlr"}, "tbp1": {"estimator": "truncated-bp", "truncation": 1},
              "tbp3": {"estimator": "truncated-bp", "truncation": 3}, "full-bp": {"estimator": "full-bp"},
              "ddpo": {"estimator": "ddpo"}}
# "default": the app's own defaults on the built-in model, untouched; "<estimator>": without the
# regularisers; "<estimator>+reg": with them. The guard (threshold 0.05) is on in every arm.
ARMS: dict[str, dict[str, Any]] = {"default": {}, **{n: {**e, **UNREGULARISED} for n, e in ESTIMATORS.items()},
                                   **{f"{n}+reg": {**e, **REGULARISED} for n, e in ESTIMATORS.items()},
                                   # one regulariser at a time (screening)
                                   **{f"{n}+fid": {**e, **UNREGULARISED, "fidelity_weight": 1.0,
                                                   "fidelity_check_every": 5} for n, e in ESTIMATORS.items()},
                                   **{f"{n}+kl": {**e, **UNREGULARISED, "kl_coef": 0.3} for n, e in ESTIMATORS.items()},
                                   # the default with its fidelity term weighed up against the proxy's logit scale
                                   "default+fid3": {"fidelity_weight": 3.0},
                                   # ... and with the proxy's reward in units of its spread on the judged
                                   # images: the regularisers as they are, and at half their weights
                                   "default+norm": {"normalize_reward": True},
                                   "default+norm-half": {"normalize_reward": True, "kl_coef": 0.15,
                                                         "fidelity_weight": 0.5},
                                   # ... and with the KL to the parent also on the model's anchor prompts
                                   # (prior preservation, where the rater never looked)
                                   "default+anchor": {"anchor_kl": 3.0},
                                   # ... and with 2 more rows per batch on the anchor prompts, rewarded by
                                   # fidelity alone (prior preservation through the estimator's gradient)
                                   "default+anchorfid": {"anchor_fidelity": 10.0},
                                   # ... and with the KL to the base model, not the round's parent
                                   "default+klbase": {"kl_reference": "base"},
                                   # ... and with the guard drawing 4 images per probe prompt, not 2
                                   "default+probes4": {"fidelity_probe_images": 4},
                                   # ... and with 24 held-out probe prompts, a drop read over the named attributes
                                   # (the default since bench/results/loop.json measured it: the same as "default")
                                   "default+held24": {"fidelity_probe_prompts": 32, "fidelity_rule": "attributes"},
                                   # the previous default: 16 probe prompts, groups judged apart (loop_split.json)
                                   "default+split": {"fidelity_probe_prompts": 16, "fidelity_rule": "split"}}


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_loop_example", ROOT / "examples" / "api_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _draw(client, example, prompts, seeds, version_id) -> tuple[torch.Tensor, list[str]]:
    images, texts = [], []
    for prompt in prompts:
        for seed in seeds:
            samples = client.predict(prompt, PER_SEED, seed, LOOP["sample_steps"], LOOP["guidance"], version_id, True,
                                     api_name="/generate")
            images.append(example.batch(samples))
            texts += [s["prompt"] for s in samples]
    return torch.cat(images), texts


@functools.cache
def guard_judge() -> Any:
    """The app's fidelity judge on the built-in model (what the guard reads), loaded once per process."""
    from rlr_core.fidelity import ShapesFidelity

    return ShapesFidelity()


@torch.no_grad()
def measure(client, example, rater, version_id: int) -> dict[str, Any]:
    """One version on fixed noise: score, pixel-judged fidelity and quality (see the module docstring),
    and, to tell a blind judge from a probe set that missed, the guard's judge on the same images
    and the pixel judge's misses per attribute (``no_shape``: images where it found no shape)."""
    from rlr_core.shapesworld import pixel_judge
    from rlr_core.shapesworld import world as sw

    rated, rated_prompts = _draw(client, example, RATE_PROMPTS, SCORE_SEEDS, version_id)
    held, held_prompts = _draw(client, example, HELD_OUT, FIDELITY_SEEDS, version_id)
    scores = rater.score(rated, rated_prompts)
    images, prompts = torch.cat([rated, held]), rated_prompts + held_prompts
    readings = pixel_judge.read(images)
    fid = pixel_judge.prompt_fidelity(readings, prompts)
    fid_rated, fid_held = fid[:len(rated)], fid[len(rated):]  # the held-out images come last
    quality = pixel_judge.quality(images, prompts)["quality"]
    judged = [i for i, q in enumerate(prompts) if guard_judge().judges(q)]
    guard_fid = guard_judge().accuracy(images[judged], [prompts[i] for i in judged])
    wanted = [sw.parse_caption(q).specified() for q in prompts]
    misses = {a: round(statistics.mean(r.value(a) != w[a] for r, w in zip(readings, wanted) if a in w), 4)
              for a in sw.ATTRIBUTES if any(a in w for w in wanted)}
    return {"scores": [round(float(x), 5) for x in scores], "score": round(float(scores.mean()), 4),
            "fidelity": round(statistics.mean(f for f in fid if f is not None), 4),
            "fidelity_rated": round(statistics.mean(f for f in fid_rated if f is not None), 4),
            "fidelity_held_out": round(statistics.mean(fid_held), 4),
            # per image, in a fixed order (the same prompts and noise for every version): paired errors
            "fidelity_images": {"rated": [None if f is None else round(f, 4) for f in fid_rated],
                                "held_out": [round(f, 4) for f in fid_held]},
            "quality": round(float(quality.mean()), 4), "guard_judge_fidelity": round(float(guard_fid.mean()), 4),
            "pixel_misses": misses, "no_shape": round(statistics.mean(r.size is None for r in readings), 4)}


def run_one(arm: str, taste: str, seed: int, rounds: int, log=print,
            on_round: Callable[[dict[str, Any]], None] | None = None, keep_data: Path | None = None) -> dict[str, Any]:
    """One run of the loop; ``on_round`` gets the run so far after the base and after every round
    (what a run cut short has measured). The app's data folder is temporary, or ``keep_data``
    (emptied first; kept for ``bench/guard_rules.py``)."""
    import gradio_client

    from app.config import AppConfig
    from app.round_config import BUILTIN_IMAGE_DEFAULTS
    from app.server import serve
    from bench.guard_probes import PixelVerdicts
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.fidelity import ShapesFidelity
    from rlr_core.shapesworld import raters
    from rlr_core.shapesworld.perception import load

    example = load_example()
    rater = raters.RATERS[taste](load(), seed=seed)
    settings = {**ARMS[arm]}
    rows: list[dict[str, Any]] = []
    measured: dict[int, dict[str, Any]] = {}
    started = time.perf_counter()

    def record(complete: bool) -> dict[str, Any]:
        """The run as it is cached: finished, or as far as it got."""
        return {"arm": arm, "taste": taste, "seed": seed, "rounds": rows, "settings": settings,
                "warm_round_process": True, "round_defaults": BUILTIN_IMAGE_DEFAULTS,
                "seconds": round(time.perf_counter() - started, 1), "complete": complete}

    if keep_data is not None:
        shutil.rmtree(keep_data, ignore_errors=True)
        keep_data.mkdir(parents=True)
    folder = contextlib.nullcontext(str(keep_data)) if keep_data else tempfile.TemporaryDirectory(prefix="rlr-loop-")
    with folder as tmp, \
            serve(AppConfig(data_dir=Path(tmp), port=0), BuiltinBackend.load()) as app:
        app.services.rounds.warm_up()  # as python app.py does once it serves
        client = gradio_client.Client(app.url, verbose=False)
        pixel_verdicts = PixelVerdicts(app.services.models, Path(tmp), ShapesFidelity.name)
        rater_id = f"sim-{taste}"

        def version_of(active: bool = True, version_id: int | None = None) -> dict[str, Any]:
            versions = client.predict(api_name="/versions")
            return next(v for v in versions if (v["active"] if active else v["version_id"] == version_id))

        def measured_version(vid: int) -> dict[str, Any]:
            if vid not in measured:
                measured[vid] = measure(client, example, rater, vid)
            return measured[vid]

        # the base version exists once something is drawn; measure it first
        example.generate(client, RATE_PROMPTS[0], 1, 0, LOOP["sample_steps"], preview=True)
        base = version_of()
        rows.append({"round": 0, "version": base["name"], "version_id": base["version_id"],
                     **measured_version(base["version_id"])})
        log(f"[{arm} {taste} {seed}] base: score {rows[0]['score']:.3f}, fidelity {rows[0]['fidelity']:.3f}")
        if on_round:
            on_round(record(complete=False))
        for r in range(1, rounds + 1):
            for i, prompt in enumerate(RATE_PROMPTS):
                samples = example.generate(client, prompt, LOOP["rated_per_round"] // len(RATE_PROMPTS),
                                           10_000 * seed + 100 * r + i, LOOP["sample_steps"])
                example.rate_all(client, rater, rater_id, samples)
            example.compare_some(client, rater, rater_id, LOOP["comparisons_per_round"])
            # a person spends minutes rating 32 images and answering 24 pairs; the app draws the
            # guard's parent and base probes meanwhile (app/guard_prefetch.py): wait as long as that takes
            waited = time.perf_counter()
            app.services.rounds.prefetch.wait_drawn(timeout=600)
            waited = time.perf_counter() - waited
            t0 = time.perf_counter()
            phases: list[tuple[float, str]] = []  # when each progress message first showed (s into the round)
            status = example.train(client, {**settings, "seed": 1000 * seed + r}, poll=0.5,
                                   log=lambda line, t0=t0, phases=phases: phases.append(
                                       (round(time.perf_counter() - t0, 1), line.strip())))
            wall = time.perf_counter() - t0
            if status["state"] != "finished":
                raise RuntimeError(f"round {r} ended {status['state']}: {status.get('error')}")
            new = version_of(active=False, version_id=status["version_id"])
            active = version_of()
            m = new["metrics"]
            row = {"round": r, "version": new["name"], "version_id": new["version_id"],
                   "active_version": active["name"], "guard_flagged": bool(m.get("fidelity_flagged")),
                   "guard_fidelity": m.get("fidelity"), "guard_fidelity_parent": m.get("fidelity_parent"),
                   "guard_fidelity_base": m.get("fidelity_base"), "guard_drop_se": m.get("fidelity_drop_se"),
                   "guard_drop_from_base_se": m.get("fidelity_drop_from_base_se"),
                   "guard_drop_rated": m.get("fidelity_drop_rated"),
                   "guard_drop_held_out": m.get("fidelity_drop_held_out"),
                   # below 1: flagged as trained, scaled back toward the parent until it passed
                   "guard_strength": m.get("fidelity_strength"), "guard_full_fidelity": m.get("fidelity_full"),
                   "guard_full_drop_rated": m.get("fidelity_full_drop_rated"),
                   "guard_full_drop_held_out": m.get("fidelity_full_drop_held_out"),
                   "fidelity_stopped_at": m.get("fidelity_stopped_at"),
                   "plateau_stopped_at": m.get("plateau_stopped_at"), "steps_done": m.get("steps_done"),
                   "watch_fidelity_start": m.get("watch_fidelity_start"),
                   "watch_fidelity_last": m.get("watch_fidelity_last"),
                   "round_wall_s": round(wall, 1), "probes_ahead_wait_s": round(waited, 1),
                   "train_s": m.get("train_seconds"), "phases": phases,
                   "proxy_heldout_accuracy": m.get("proxy_heldout_accuracy"),
                   # the proxy's reward spread over the judged images; the round's reward was divided by
                   # reward_scale (1 unless normalize_reward)
                   "proxy_reward_spread": m.get("proxy_reward_spread"), "reward_scale": m.get("reward_scale")}
            if m.get("fidelity_judge"):  # the guard ran: its verdict again, from the pixels on its own probes
                stored = app.services.store.get_model_version(new["version_id"])
                parent_id = stored["parent_id"]
                row["guard_on_pixels"] = pixel_verdicts.verdict(new["version_id"], parent_id, base["version_id"],
                                                                m["fidelity_threshold"],
                                                                stored["config"]["fidelity_probe_images"],
                                                                stored["config"].get("fidelity_rule", "split"))
            new_measure = measured_version(new["version_id"])
            row["new_version"] = {k: new_measure[k] for k in ("score", "fidelity", "fidelity_rated",
                                                              "fidelity_held_out", "quality",
                                                              "guard_judge_fidelity", "pixel_misses", "no_shape",
                                                              "fidelity_images")}
            row.update(measured_version(active["version_id"]))
            rows.append(row)
            log(f"[{arm} {taste} {seed}] round {r}: {new['name']}{' FLAGGED' if row['guard_flagged'] else ''}, "
                f"active {active['name']}: score {row['score']:.3f}, fidelity {row['fidelity']:.3f} "
                f"(new version: {new_measure['score']:.3f} / {new_measure['fidelity']:.3f}), round {wall:.0f} s")
            if on_round:
                on_round(record(complete=False))
        # blind wins of each version over its parent, from the pairs answered in the following rounds
        example.compare_some(client, rater, rater_id, LOOP["comparisons_per_round"])
        wins = {v["version_id"]: (v["wins_vs_parent"], v["losses_vs_parent"], v["ties_vs_parent"])
                for v in client.predict(api_name="/versions")}
    for row in rows[1:]:
        row["blind_wins_losses_ties"] = list(wins.get(row["version_id"], (0, 0, 0)))
    return record(complete=True)


def cache_path(cache: Path, arm: str, taste: str, seed: int, rounds: int) -> Path:
    return cache / f"{arm}-{taste}-seed{seed}-rounds{rounds}.json"


def partial_path(cache: Path, arm: str, taste: str, seed: int, rounds: int) -> Path:
    """Where a run in progress keeps what it has measured (removed when it finishes)."""
    return cache / f"{arm}-{taste}-seed{seed}-rounds{rounds}.partial.json"


def load_runs(cache: Path, wanted: list[tuple[str, str, int]], rounds: int, partial: bool) -> list[dict[str, Any]]:
    """The finished runs, and with ``partial`` also the rounds of runs cut short (at least one round)."""
    runs = []
    for w in wanted:
        done, cut = cache_path(cache, *w, rounds), partial_path(cache, *w, rounds)
        if done.exists():
            runs.append(json.loads(done.read_text()))
        elif partial and cut.exists():
            run = json.loads(cut.read_text())
            if len(run["rounds"]) > 1:
                runs.append(run)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["default"], choices=list(ARMS))
    p.add_argument("--tastes", nargs="+", default=["bold", "composition"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--default-arm", default="default", help="the arm the targets are checked on")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/loop")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "loop.json"))
    p.add_argument("--plot", default=str(ROOT / "bench" / "results" / "loop.png"))
    p.add_argument("--from-cache", action="store_true", help="summarise the cached runs only")
    p.add_argument("--partial", action="store_true",
                   help="also summarise the rounds of runs cut short (e.g. by a time limit)")
    p.add_argument("--markdown", action="store_true", help="also print the per-round table in markdown")
    p.add_argument("--idle-cache", default=None,
                   help="runs made alone on the machine (--one ... --threads 2 --cache DIR): their round times "
                        "decide the 120 s target")
    p.add_argument("--keep-data", action="store_true",
                   help="keep each run's app data folder (CACHE/data/ARM-TASTE-seedN) for bench/guard_rules.py")
    p.add_argument("--one", nargs=3, metavar=("ARM", "TASTE", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.one:  # a worker process: one run, written to the cache
        arm, taste, seed = args.one[0], args.one[1], int(args.one[2])
        cut = partial_path(cache, arm, taste, seed, args.rounds)
        run = run_one(arm, taste, seed, args.rounds, log=lambda line: print(line, flush=True),
                      on_round=lambda so_far: save_json_atomic(cut, so_far),
                      keep_data=cache / "data" / f"{arm}-{taste}-seed{seed}" if args.keep_data else None)
        save_json_atomic(cache_path(cache, arm, taste, seed, args.rounds), run)
        cut.unlink(missing_ok=True)
        return
    wanted = [(a, t, s) for s in args.seeds for a in args.arms for t in args.tastes]
    todo = [w for w in wanted if not cache_path(cache, *w, args.rounds).exists()]
    if todo and not args.from_cache:
        print(f"{len(todo)} run(s) to do, {len(wanted) - len(todo)} cached", flush=True)

        def work(w: tuple[str, str, int]) -> int:
            cmd = [sys.executable, "-m", "bench.loop", "--one", w[0], w[1], str(w[2]), "--rounds", str(args.rounds),
                   "--threads", str(args.threads), "--cache", str(cache)] + (["--keep-data"] if args.keep_data else [])
            return subprocess.call(cmd, cwd=ROOT)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(work, todo))
        if any(codes):
            print(f"warning: {sum(c != 0 for c in codes)} run(s) failed", flush=True)
    runs = load_runs(cache, wanted, args.rounds, args.partial)
    if not runs:
        raise SystemExit("no finished runs to summarise")
    idle = [json.loads(f.read_text()) for f in sorted(Path(args.idle_cache).glob("*.json"))] if args.idle_cache else []
    summary = summarise(runs, args.default_arm, idle)
    n = args.rounds + 1
    print_table(summary["table"], ["arm", "taste", "seeds", *[f"score_{i}" for i in range(n)],
                                   *[f"fidelity_{i}" for i in range(n)], "quality_last", "flagged", "round_s"],
                title="score and pixel-judged fidelity per round (means over seeds)")
    for t in summary["targets"]:
        print(f"{'MET ' if t['met'] else 'MISS'}  {t['check']}: {t['value']}")
    if args.markdown:
        print(markdown(runs))
        print()
        print(versions_markdown(runs))
    write_json(args.json, {"loop": {**LOOP, "rate_prompts": RATE_PROMPTS, "held_out": HELD_OUT,
                                    "score_seeds": SCORE_SEEDS, "fidelity_seeds": FIDELITY_SEEDS,
                                    "rounds": args.rounds, "arms": {a: ARMS[a] for a in args.arms},
                                    "tastes": args.tastes, "seeds": args.seeds}, **summary, "runs": runs,
                           "idle_runs": idle})
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
