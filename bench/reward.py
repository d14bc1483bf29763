"""Benchmark: how fast the reward proxy learns a simulated rater, and how fast the store writes.

    python -m bench.reward [--quick] [--json OUT]

1. Proxy accuracy vs number of ratings (pairwise answers, skips included: each one cost the
   person a click), for several simulated raters, with random vs active pair selection.
   World: ``--prompts`` random ShapesWorld prompts; per prompt a pool of candidate renders from
   an imperfect "generator" (each attribute the prompt asks for is wrong with probability 0.35).
   Accuracy is measured on pairs of *fresh* renders of the same prompts against the rater's
   latent utility, on pairs it clearly distinguishes (|du| >= 0.1, i.e. it prefers one side
   with probability >= 0.73 at temperature 0.1).
2. Store throughput: 8 threads add star ratings at once; ratings/s and write latency (p50/p99).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from feedback_store import OUTCOME_LABEL, FeedbackStore
from rlr_core.feedback.active_selection import SelectionPolicy, disagreement_from_features
from rlr_core.feedback.encoders import PerceptionImageEncoder
from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
from rlr_core.feedback.reward_proxy import (
    Features,
    FitConfig,
    RewardProxy,
    embed_items,
    fit_features,
    pairwise_accuracy,
)
from rlr_core.shapesworld import perception
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.raters import RATERS, SimulatedRater

CLEAR_MARGIN = 0.1
EMPTY = torch.zeros(0, dtype=torch.long)


@dataclasses.dataclass
class Pool:
    images: torch.Tensor  # (N, 3, 32, 32)
    prompts: list[str]
    prompt_idx: np.ndarray  # (N,)
    emb: torch.Tensor
    prompt_feats: torch.Tensor

    def same_prompt_pairs(self) -> np.ndarray:
        pairs = [(a, b) for j in np.unique(self.prompt_idx) for a in np.flatnonzero(self.prompt_idx == j)
                 for b in np.flatnonzero(self.prompt_idx == j) if a < b]
        return np.array(pairs, dtype=np.int64)


def make_prompts(rng: random.Random, n: int) -> list[sw.PartialScene]:
    prompts: list[sw.PartialScene] = []
    while len(prompts) < n:
        p = sw.random_partial(rng, sw.PartialScene().complete(rng), drop_prob=0.4)
        if p.specified() and p not in prompts:
            prompts.append(p)
    return prompts


def imperfect_render(p: sw.PartialScene, rng: random.Random, nrng: np.random.Generator) -> np.ndarray:
    """A render of what a not-yet-aligned generator might make for prompt ``p``."""
    scene = p.complete(rng).as_dict()
    for attr in p.specified():
        if rng.random() < 0.35:
            scene[attr] = rng.choice(sw.ATTRIBUTES[attr])
    return sw.render(sw.Scene(**scene), nrng)


def make_pool(proxy: RewardProxy, prompts: Sequence[sw.PartialScene], per_prompt: int, seed: int) -> Pool:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    images, texts, idx = [], [], []
    for j, p in enumerate(prompts):
        for _ in range(per_prompt):
            images.append(imperfect_render(p, rng, nrng))
            texts.append(sw.caption(p))
            idx.append(j)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    emb, pf = embed_items(proxy, x, texts)
    return Pool(x, texts, np.array(idx), emb, pf)


def clear_test_pairs(rater: SimulatedRater, pool: Pool) -> Features:
    """Test pairs the rater clearly distinguishes, labelled by its latent utility."""
    with torch.no_grad():
        u = rater.score(pool.images, pool.prompts)
    pairs = torch.from_numpy(pool.same_prompt_pairs())
    du = u[pairs[:, 0]] - u[pairs[:, 1]]
    keep = du.abs() >= CLEAR_MARGIN
    return Features(pool.emb, pool.prompt_feats, pairs[keep], (du[keep] > 0).float(), EMPTY, EMPTY)


def learning_curve(proxy: RewardProxy, rater: SimulatedRater, train: Pool, test: Features, strategy: str,
                   checkpoints: Sequence[int], batch: int, seed: int, fit_cfg: FitConfig) -> dict[int, float]:
    """Ask ``max(checkpoints)`` pairs in batches (random, or active after a random first batch);
    refit after each batch; return held-out accuracy at each checkpoint."""
    rng = np.random.default_rng(seed)
    policy = SelectionPolicy()
    candidates = train.same_prompt_pairs()
    asked = np.zeros(len(candidates), dtype=bool)
    judged: list[tuple[int, int, float]] = []
    n_answers, curve = 0, {}
    while n_answers < max(checkpoints):
        open_idx = np.flatnonzero(~asked)
        if strategy == "random" or not judged:
            pick = rng.choice(open_idx, size=batch, replace=False)
        else:
            c = candidates[open_idx]
            scores = disagreement_from_features(proxy, train.emb[c[:, 0]], train.emb[c[:, 1]],
                                                train.prompt_feats[c[:, 0]])
            prompts = [train.prompts[i] for i in c[:, 0]]
            pick = open_idx[policy.select(scores.numpy(), prompts, batch, rng)]
        asked[pick] = True
        left, right = candidates[pick, 0], candidates[pick, 1]
        answers = rater.compare(train.images[left], train.images[right], [train.prompts[i] for i in left])
        judged += [(int(a), int(b), OUTCOME_LABEL[o]) for a, b, o in zip(left, right, answers) if o != "skip"]
        n_answers += batch
        f = Features(train.emb, train.prompt_feats, torch.tensor([j[:2] for j in judged]).reshape(-1, 2),
                     torch.tensor([j[2] for j in judged]), EMPTY, EMPTY)
        fit_features(proxy, f, fit_cfg)
        if n_answers in checkpoints:
            curve[n_answers] = pairwise_accuracy(proxy, test)
    return curve


def ratings_to_match(active: dict[int, float], target: float) -> int | None:
    return next((n for n in sorted(active) if active[n] >= target), None)


def reward_benchmark(args: argparse.Namespace) -> dict:
    model = perception.load()
    proxy = RewardProxy(PerceptionImageEncoder(model), BagOfWordsPromptEncoder())
    fit_cfg = FitConfig(holdout_frac=0.0)
    checkpoints = list(range(args.batch, args.max_ratings + 1, args.batch))
    results: dict = {"raters": {}, "checkpoints": checkpoints, "config": vars(args).copy()}
    for name in args.raters:
        per_seed: dict[str, list[dict[int, float]]] = {"random": [], "active": []}
        for seed in range(args.seeds):
            prompts = make_prompts(random.Random(1000 + seed), args.prompts)
            train = make_pool(proxy, prompts, args.pool, seed=2000 + seed)
            test_pool = make_pool(proxy, prompts, args.test_pool, seed=3000 + seed)
            for strategy in ("random", "active"):
                rater = RATERS[name](model, seed=seed)
                test = clear_test_pairs(rater, test_pool)
                t0 = time.perf_counter()
                curve = learning_curve(proxy, rater, train, test, strategy, checkpoints, args.batch,
                                       seed, fit_cfg)
                per_seed[strategy].append(curve)
                print(f"  {name:12s} seed {seed} {strategy:6s} {time.perf_counter() - t0:5.1f}s  "
                      + " ".join(f"{n}:{curve[n]:.3f}" for n in checkpoints if n in args.report_at),
                      file=sys.stderr, flush=True)
        mean = {s: {n: statistics.fmean(c[n] for c in curves) for n in checkpoints}
                for s, curves in per_seed.items()}
        match = {str(n): ratings_to_match(mean["active"], mean["random"][n]) for n in args.report_at
                 if n in mean["random"]}
        results["raters"][name] = {"mean_accuracy": mean, "per_seed": per_seed,
                                   "active_ratings_to_match_random": match,
                                   "n_test_pairs": len(test.pairs)}
    return results


def store_benchmark(writers: int = 8, per_writer: int = 150, synchronous: str = "FULL",
                    pace_s: float = 0.0) -> dict:
    """``writers`` threads add star ratings concurrently (back to back, or one every ``pace_s``
    seconds each); time every add_rating call."""
    with tempfile.TemporaryDirectory() as tmp:
        store = FeedbackStore(tmp, synchronous=synchronous)
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        ids = [store.add_sample(image + i % 255, "a red circle", seed=i) for i in range(per_writer)]
        latencies: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        start = threading.Barrier(writers)

        def writer(w: int) -> None:
            mine = []
            try:
                start.wait()
                for i, sid in enumerate(ids):
                    t = time.perf_counter()
                    store.add_rating(sid, f"rater-{w}", 1 + (i + w) % 5)
                    mine.append(time.perf_counter() - t)
                    if pace_s:
                        time.sleep(random.uniform(0, 2 * pace_s))
            except BaseException as err:  # recorded and reported: a lost write must not pass silently
                errors.append(err)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stored = store.counts()["ratings"]
        store.close()
    ms = np.array(latencies) * 1000
    return {"synchronous": synchronous, "pace_s": pace_s, "writers": writers, "ratings": len(latencies),
            "stored": stored, "errors": [repr(e) for e in errors], "ratings_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def store_repeated(repeats: int, **kw) -> dict:
    """Several runs of one store configuration: this machine is shared, so single p99s are noisy."""
    runs = [store_benchmark(**kw) for _ in range(repeats)]
    summary = {k: runs[0][k] for k in ("synchronous", "pace_s", "writers")}
    for key in ("ratings_per_s", "p50_ms", "p99_ms", "max_ms"):
        summary[key] = statistics.median(r[key] for r in runs)
    summary.update(p99_ms_range=[min(r["p99_ms"] for r in runs), max(r["p99_ms"] for r in runs)],
                   ratings=sum(r["ratings"] for r in runs), stored=sum(r["stored"] for r in runs),
                   errors=[e for r in runs for e in r["errors"]], runs=runs)
    return summary


def print_tables(reward: dict | None, stores: list[dict] | None) -> None:
    if reward:
        print_reward_table(reward)
    if stores:
        print_store_table(stores)


def print_reward_table(reward: dict) -> None:
    cols = reward["config"]["report_at"]
    print("\nHeld-out pairwise accuracy vs number of ratings (mean over seeds)")
    print(f"| rater | selection | {' | '.join(str(n) for n in cols)} |")
    print("|---|---|" + "---|" * len(cols))
    for name, r in reward["raters"].items():
        for s in ("random", "active"):
            accs = " | ".join(f"{r['mean_accuracy'][s][n]:.3f}" for n in cols)
            print(f"| {name} | {s} | {accs} |")
    print("\nRatings active selection needs to match random selection's accuracy at N ratings")
    for name, r in reward["raters"].items():
        print(f"  {name}: " + ", ".join(f"random@{n} -> active@{m}" for n, m
                                        in r["active_ratings_to_match_random"].items()))


def print_store_table(stores: list[dict]) -> None:
    print("\nStore: 8 writer threads adding star ratings (median over runs; p99 range in brackets)")
    print("| synchronous | pacing | runs x ratings | ratings/s | p50 ms | p99 ms | max ms | errors | lost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for st in stores:
        pacing = f"~{1 / st['pace_s']:.0f}/s per writer" if st["pace_s"] else "back to back"
        lo, hi = st["p99_ms_range"]
        print(f"| {st['synchronous']} | {pacing} | {len(st['runs'])} x {st['runs'][0]['ratings']} | "
              f"{st['ratings_per_s']:.0f} | {st['p50_ms']:.1f} | {st['p99_ms']:.1f} [{lo:.1f}-{hi:.1f}] | "
              f"{st['max_ms']:.1f} | {len(st['errors'])} | {st['ratings'] - st['stored']} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer raters, seeds and ratings (~1-2 minutes)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", choices=("all", "reward", "store"), default="all",
                   help="run one half only; with --json, the other half already in the file is kept")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.raters = ["bold", "fidelity"] if args.quick else list(RATERS)
    args.seeds = 1 if args.quick else 3
    args.max_ratings = 200 if args.quick else 400
    args.report_at = [n for n in (25, 50, 100, 200, 400) if n <= args.max_ratings]
    args.batch, args.prompts, args.pool, args.test_pool = 25, 16, 30, 20
    t0 = time.perf_counter()
    reward = stores = None
    if args.part in ("all", "reward"):
        reward = reward_benchmark(args)
        reward["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in reward["config"].items()}
    if args.part in ("all", "store"):
        n, repeats = (60, 3) if args.quick else (150, 5)
        stores = [store_repeated(repeats, per_writer=n, synchronous="NORMAL"),
                  store_repeated(repeats, per_writer=n, synchronous="NORMAL", pace_s=0.05)]
        if not args.quick:
            stores.append(store_repeated(repeats, per_writer=n, synchronous="FULL"))
    print_tables(reward, stores)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.exists() and args.part != "all" else {}
        result = {"reward": reward or old.get("reward"), "store": stores or old.get("store")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
