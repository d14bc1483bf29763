"""Does the app slide backwards? The feedback loop through the app's API, with a simulated rater.

    python -m bench.safeguards [--seeds 0 1 2] [--rounds 4] [--json bench/results/safeguards.json]

Per seed: the app is served in-process on a fresh data folder; ``examples/api_loop.py`` plays a
person with the "bold" simulated rater (``rlr_core/shapesworld/raters.py``): each round it rates
24 fresh samples, answers 16 comparisons the app picks, trains a round with the app's default
estimator and settings (6 optimiser steps), answers 24 of the new version's blind before/after
pairs, and uses the Versions safeguard (a flagged active version is rolled back to the
best-judged one) before training on it and before it is scored. The rater's score of the active
version is measured after every round from 16 fixed-noise samples drawn in preview mode (stored
nowhere, so measuring changes nothing the app learns from); each version is also scored by id.

The same loop with the first two rounds is ``tests/test_api_loop.py``; its tolerance comes from
the seed-to-seed spread of the two-round gain measured here (``two_round_gain``).

Each finished seed is cached (``--cache``), so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import write_json

ROOT = Path(__file__).resolve().parent.parent
# The loop's settings, shared with tests/test_api_loop.py (which runs its first two rounds).
# A round: 6 steps, 16 before/after pairs; the rest as ROUND in examples/api_loop.py, with the app's estimator.
LOOP = {"steps": 6, "samples_per_prompt": 6, "comparisons": 16, "judge_after": 24, "use_guard": True,
        "round_settings": {"steps": 6, "samples_per_prompt": 4}}


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_loop_example", ROOT / "examples" / "api_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_round(estimator: str | None = None) -> dict[str, Any]:
    """The round the loop trains: the app's default estimator on the built-in model (or
    ``estimator`` with the app's settings for it), the loop's own short settings otherwise."""
    from app.round_config import BUILTIN_IMAGE_DEFAULTS

    name = estimator or BUILTIN_IMAGE_DEFAULTS["estimator"]
    return {**LOOP["round_settings"], "estimator": name, "truncation": BUILTIN_IMAGE_DEFAULTS["truncation"]}


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of mean(a) - mean(b) for scores of the same noise (paired samples)."""
    d = (a - b).double()
    return float(d.std(unbiased=True) / math.sqrt(len(d)))


def run_seed(seed: int, rounds: int, log=print, estimator: str | None = None) -> dict[str, Any]:
    import gradio_client

    from app.config import AppConfig
    from app.server import serve
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.shapesworld import raters as simulated_raters
    from rlr_core.shapesworld.perception import load

    example = load_example()
    rater = simulated_raters.bold_taste(load(), seed=seed)
    measured: dict[int, torch.Tensor] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlr-safeguards-") as tmp, \
            serve(AppConfig(data_dir=Path(tmp), port=0), BuiltinBackend.load()) as app, torch.no_grad():
        client = gradio_client.Client(app.url, verbose=False)
        scores = example.run_loop(
            client, rater, rounds=rounds, steps=LOOP["steps"], samples_per_prompt=LOOP["samples_per_prompt"],
            comparisons=LOOP["comparisons"], round_settings=default_round(estimator), seed=1000 * seed,
            judge_after=LOOP["judge_after"], use_guard=LOOP["use_guard"], log=log,
            on_score=lambda r, each: measured.__setitem__(r, each))
        versions = client.predict(api_name="/versions")
        by_version = {}
        for v in versions:  # every version by id, in preview mode: what a rollback would give back
            each = torch.cat([rater.score(example.batch(x), [y["prompt"] for y in x]) for x in (
                client.predict(p, 2, s, LOOP["steps"], 3.0, v["version_id"], True, api_name="/generate")
                for p in example.PROMPTS for s in example.EVAL_SEEDS)])
            by_version[v["name"]] = round(float(each.mean()), 4)
        status = client.predict(api_name="/train_status")
        rounds_rows = app.services.store.training_rounds()
    last = measured[rounds]
    earlier = range(1, rounds)
    best = max(earlier, key=lambda r: float(measured[r].mean())) if rounds > 1 else 0
    return {
        "seed": seed, "scores": [round(s, 4) for s in scores],
        "se": [round(float(measured[r].std() / math.sqrt(len(measured[r]))), 4) for r in range(rounds + 1)],
        "best_earlier_round": best, "last_minus_best_earlier": round(float(last.mean() - measured[best].mean()), 4),
        "paired_se": round(paired_se(last, measured[best]), 4),
        "two_round_gain": round(scores[2] - scores[0], 4) if rounds >= 2 else None,
        "versions": [{k: v[k] for k in ("name", "parent_id", "wins_vs_parent", "losses_vs_parent", "ties_vs_parent",
                                        "flagged", "best_judged", "active", "seed")} for v in versions],
        "score_by_version": by_version,
        "early_stops": [r["metrics"].get("plateau_stopped_at") for r in rounds_rows],
        "last_status_seed": status.get("seed"), "seconds": round(time.perf_counter() - started, 1),
    }


def summarise(runs: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    if not runs:
        return {"targets": [{"check": f"seeds that finished {rounds} rounds >= 3", "value": 0, "met": False},
                            {"check": f"rater score after round {rounds} >= best earlier round's - 1 SE",
                             "value": "not measured: no run finished", "met": False}]}
    met_each = [r["last_minus_best_earlier"] >= -r["paired_se"] for r in runs]
    gains = [r["two_round_gain"] for r in runs if r["two_round_gain"] is not None]
    diffs = [r["last_minus_best_earlier"] for r in runs]
    mean_diff = statistics.mean(diffs)
    se_mean = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    flagged = sum(v["flagged"] for r in runs for v in r["versions"])
    targets = [
        {"check": f"seeds that finished {rounds} rounds >= 3", "value": len(runs), "met": len(runs) >= 3},
        {"check": f"rater score after round {rounds} >= best earlier round's - 1 SE (paired), every seed",
         "value": f"{sum(met_each)}/{len(runs)} seeds; differences {diffs}", "met": all(met_each)},
        {"check": "mean over seeds of (last - best earlier round) >= -1 SE of that mean",
         "value": round(mean_diff, 4), "se": round(se_mean, 4), "met": mean_diff >= -se_mean},
    ]
    out: dict[str, Any] = {"targets": targets, "flagged_versions": flagged,
                           "mean_scores": [round(statistics.mean(r["scores"][i] for r in runs), 4)
                                           for i in range(rounds + 1)]}
    if gains:
        sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        out["two_round_gain"] = {"per_seed": gains, "mean": round(statistics.mean(gains), 4), "sd": round(sd, 4),
                                 "min": min(gains)}
    return out


def gains_of(logged: list[dict[str, Any]]) -> dict[str, Any]:
    """The two-round gain's spread over runs that reached round 2 (tests/test_api_loop.py's tolerance)."""
    gains = [round(r["scores"][2] - r["scores"][0], 4) for r in logged if len(r["scores"]) >= 3]
    sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    return {"per_run": {r["log"]: round(r["scores"][2] - r["scores"][0], 4) for r in logged if len(r["scores"]) >= 3},
            "mean": round(statistics.mean(gains), 4) if gains else None, "sd": round(sd, 4),
            "mean_minus_3sd": round(statistics.mean(gains) - 3 * sd, 4) if len(gains) > 1 else None}


def scores_from_log(path: Path) -> dict[str, Any]:
    """An unfinished run's per-round scores (3 decimals) and rollbacks, read from its printed log."""
    import re

    text = Path(path).read_text(errors="replace")
    base = re.findall(r"preference score before training: ([0-9.]+)", text)
    after = re.findall(r"round (\d+): v\d+ \(\w[\w-]*\), preference score ([0-9.]+)", text)
    return {"log": Path(path).name, "scores": [float(x) for x in base[:1]] + [float(x) for _, x in after],
            "rollbacks": re.findall(r"  (.+ is flagged .*)", text), "complete": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--estimator", default=None,
                   help="train with this estimator instead of the app's default on the built-in model")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "safeguards.json"))
    p.add_argument("--cache", default="/tmp/rlr-safeguards-cache")
    p.add_argument("--only-cached", action="store_true", help="write the results of the finished seeds only")
    p.add_argument("--unfinished-logs", nargs="*", default=[],
                   help="logs of runs that did not finish: their per-round scores are recorded beside")
    args = p.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        path = cache / f"{default_round(args.estimator)['estimator']}-seed{seed}-rounds{args.rounds}.json"
        if path.exists():
            runs.append(json.loads(path.read_text()))
            continue
        if args.only_cached:
            continue
        run = run_seed(seed, args.rounds, log=lambda line: print(line, flush=True), estimator=args.estimator)
        path.write_text(json.dumps(run))
        print(json.dumps(run), flush=True)
        runs.append(run)
    from app.round_config import BUILTIN_IMAGE_DEFAULTS

    unfinished = [scores_from_log(Path(x)) for x in args.unfinished_logs]

    write_json(args.json, {"loop": {**LOOP, "round_settings": default_round(args.estimator), "rounds": args.rounds,
                                    "seeds": args.seeds, "round_defaults": BUILTIN_IMAGE_DEFAULTS},
                           **summarise(runs, args.rounds), "runs": runs,
                           "unfinished_runs": unfinished, **({} if runs else {"two_round_gain": gains_of(unfinished)})})


if __name__ == "__main__":
    main()
