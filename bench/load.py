"""Load test: many raters at once while training rounds run; no acknowledged judgement may be lost.

    python -m bench.load [--raters 50] [--duration 300] [--no-rounds] [--json bench/results/load.json]

Starts the app in this process on a temporary data folder (the built-in model), draws a pool of
samples, then runs ``--raters`` simulated raters, each a thread with its own ``gradio_client``
connection, for ``--duration`` seconds. Each rater repeats: fetch samples to rate and rate one it
has not rated (``/samples_to_rate``, ``/rate``), then fetch a pair and judge it (``/next_pair``,
``/compare``), pausing ``--think`` seconds (on average) between actions as a person would.
Meanwhile a training round runs whenever none is running (small rounds: new versions and new
samples keep arriving). At the end the app is closed and the database is read back: every
acknowledged rating and comparison (an id returned to the rater) must be stored with the value
the rater sent. Reported: acknowledged vs stored, errors, latency p50/p95/p99 per action
(through gradio_client, whose 50 ms polling of its queue puts a floor under every number).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import print_table, write_json

ACTIONS = ["samples_to_rate", "rate", "next_pair", "compare"]
OUTCOMES = ["left", "right", "tie-both-good", "tie-both-bad", "skip"]
POOL_PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a large green circle"]
ROUND = {"steps": 4, "batch_size": 4, "sampling_steps": 5, "max_prompts": 2, "samples_per_prompt": 2,
         "sample_steps": 6}
TARGET_P95_MS = 1000.0


@dataclass
class Tally:
    """What every rater thread reports (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ratings: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # id -> (rater, sample, stars)
    comparisons: dict[int, tuple[str, int, int, str]] = field(default_factory=dict)  # id -> (rater, l, r, outcome)
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_examples: list[str] = field(default_factory=list)

    def error(self, action: str, err: Exception) -> None:
        with self.lock:
            self.errors[action] += 1
            if len(self.error_examples) < 10:
                self.error_examples.append(f"{action}: {type(err).__name__}: {str(err)[:200]}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Rater(threading.Thread):
    def __init__(self, url: str, name: str, deadline: float, think: float, tally: Tally, seed: int):
        super().__init__(name=name, daemon=True)
        self.url, self.rater, self.deadline, self.think, self.tally = url, name, deadline, think, tally
        self.rng = random.Random(seed)
        self.rated: set[int] = set()

    def call(self, client, action: str, *args):
        t = time.perf_counter()
        try:
            result = client.predict(*args, api_name=f"/{action}")
        except Exception as err:  # every failure counts; the rater goes on as a person would
            self.tally.error(action, err)
            return None
        with self.tally.lock:
            self.tally.latency_ms[action].append((time.perf_counter() - t) * 1000)
        return result

    def pause(self) -> None:
        time.sleep(self.think * self.rng.uniform(0.5, 1.5))

    def run(self) -> None:
        from gradio_client import Client

        try:
            client = Client(self.url, verbose=False)
        except Exception as err:
            self.tally.error("connect", err)
            return
        while time.time() < self.deadline:
            todo = self.call(client, "samples_to_rate", self.rater, 8) or []
            todo = [s["sample_id"] for s in todo if s["sample_id"] not in self.rated]
            if todo:
                sid, stars = self.rng.choice(todo), self.rng.randint(1, 5)
                ack = self.call(client, "rate", sid, stars, self.rater)
                if ack:
                    self.rated.add(sid)
                    with self.tally.lock:
                        self.tally.ratings[ack["rating_id"]] = (self.rater, sid, stars)
            self.pause()
            if time.time() >= self.deadline:
                break
            pair = self.call(client, "next_pair", self.rater)
            if pair:
                left, right = pair["left"]["sample_id"], pair["right"]["sample_id"]
                outcome = self.rng.choice(OUTCOMES)
                ack = self.call(client, "compare", left, right, outcome, self.rater, round(self.rng.uniform(0.5, 4), 2))
                if ack:
                    with self.tally.lock:
                        self.tally.comparisons[ack["comparison_id"]] = (self.rater, left, right, outcome)
            self.pause()
        getattr(client, "close", lambda: None)()


def keep_training(services, deadline: float, stop: threading.Event, counts: dict[str, int]) -> None:
    """Start a small round whenever none is running, until the deadline."""
    from app.errors import AppError
    from app.round_config import RoundConfig

    while time.time() < deadline and not stop.is_set():
        if not services.worker.status().active:
            try:
                services.rounds.start(RoundConfig.parse({**ROUND, "seed": counts["started"]}))
                counts["started"] += 1
            except AppError:
                pass
        time.sleep(0.5)


def stored_rows(db_path: Path) -> tuple[dict[int, tuple], dict[int, tuple]]:
    """Ratings and comparisons of the simulated raters, read with SQLite after the app closed."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ratings = {r[0]: tuple(r[1:]) for r in db.execute(
            "SELECT id, rater_id, sample_id, stars FROM ratings WHERE rater_id LIKE 'load-%'")}
        comparisons = {r[0]: tuple(r[1:]) for r in db.execute(
            "SELECT id, rater_id, left_id, right_id, outcome FROM comparisons WHERE rater_id LIKE 'load-%'")}
    finally:
        db.close()
    return ratings, comparisons


def check(acked: dict[int, tuple], stored: dict[int, tuple]) -> dict[str, int]:
    missing = [i for i in acked if i not in stored]
    wrong = [i for i in acked if i in stored and stored[i] != acked[i]]
    return {"acknowledged": len(acked), "stored": len(stored), "missing": len(missing), "wrong_value": len(wrong),
            "unacknowledged_extra": len(set(stored) - set(acked))}


def run(raters: int, duration: float, rounds: bool, think: float, data_dir: Path) -> dict:
    import torch
    from gradio_client import Client

    from app.config import AppConfig
    from app.server import start

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    running = start(AppConfig(data_dir=data_dir, port=0))
    started_s = time.perf_counter() - t0
    round_counts = {"started": 0, "finished": 0, "failed": 0}
    tally = Tally()
    try:
        setup = Client(running.url, verbose=False)
        pool = [s for i, p in enumerate(POOL_PROMPTS)
                for s in setup.predict(p, 8, i, 4, 3.0, api_name="/generate")]
        setup.predict(pool[0]["sample_id"], 3, "setup", api_name="/rate")  # a round needs a judgement
        setup.close()
        deadline = time.time() + duration
        stop = threading.Event()
        trainer = threading.Thread(target=keep_training, args=(running.services, deadline, stop, round_counts),
                                   daemon=True)
        if rounds:
            trainer.start()
        threads = [Rater(running.url, f"load-{i:03d}", deadline, think, tally, seed=i) for i in range(raters)]
        for th in threads:
            th.start()
            time.sleep(min(0.05, think / max(raters, 1)))  # do not connect all at the same instant
        for th in threads:
            th.join(timeout=duration + 120)
        stuck = sum(th.is_alive() for th in threads)
        stop.set()
        if rounds:
            trainer.join(timeout=30)
        store = running.services.store
        round_counts["finished"] = len(store.training_rounds("finished"))
        round_counts["failed"] = len([r for r in store.training_rounds("failed")
                                      if "stopped on request" not in (r.get("error") or "")])
    finally:
        running.services.worker.stop()  # a round still running is stopped (it writes no version)
        running.close()
    ratings, comparisons = stored_rows(Path(data_dir) / "feedback.db")
    return {"tally": tally, "stuck": stuck, "rounds": round_counts, "started_s": started_s,
            "ratings": check(tally.ratings, ratings), "comparisons": check(tally.comparisons, comparisons),
            "pool": len(pool)}


def summarise(out: dict, raters: int, duration: float, think: float, rounds: bool) -> dict:
    tally: Tally = out["tally"]
    latency = [{"action": a, "calls": len(tally.latency_ms.get(a, [])), "errors": tally.errors.get(a, 0),
                **{f"p{q}_ms": percentile(tally.latency_ms.get(a, []), q) for q in (50, 95, 99)},
                "max_ms": max(tally.latency_ms.get(a, []), default=None)} for a in ACTIONS]
    errors = sum(tally.errors.values())
    r, c = out["ratings"], out["comparisons"]
    p95 = {row["action"]: row["p95_ms"] for row in latency}
    targets = [
        {"check": "every acknowledged rating stored with its value",
         "value": f"{r['acknowledged']} acknowledged, {r['stored']} stored, {r['missing']} missing, "
                  f"{r['wrong_value']} wrong",
         "met": r["acknowledged"] == r["stored"] and not r["missing"] and not r["wrong_value"]},
        {"check": "every acknowledged comparison stored with its value",
         "value": f"{c['acknowledged']} acknowledged, {c['stored']} stored, {c['missing']} missing, "
                  f"{c['wrong_value']} wrong",
         "met": c["acknowledged"] == c["stored"] and not c["missing"] and not c["wrong_value"]},
        {"check": "no errors and no stuck rater", "value": f"{errors} errors, {out['stuck']} stuck",
         "met": errors == 0 and out["stuck"] == 0},
    ]
    for action in ("rate", "compare"):
        v = p95[action]
        targets.append({"check": f"p95 latency of {action} under {TARGET_P95_MS:.0f} ms", "value": v,
                        "met": v is not None and v < TARGET_P95_MS})
    if rounds:
        targets.append({"check": "training rounds ran during the test",
                        "value": f"{out['rounds']['started']} started, {out['rounds']['finished']} finished, "
                                 f"{out['rounds']['failed']} failed",
                        "met": out["rounds"]["finished"] >= 1 and out["rounds"]["failed"] == 0})
    return {"raters": raters, "duration_s": duration, "think_s": think, "rounds": rounds,
            "app_start_s": out["started_s"], "sample_pool": out["pool"],
            "rounds_started": out["rounds"]["started"], "rounds_finished": out["rounds"]["finished"],
            "rounds_failed": out["rounds"]["failed"],
            "ratings": r, "comparisons": c, "errors": dict(tally.errors), "error_examples": tally.error_examples,
            "stuck_raters": out["stuck"], "latency": latency, "targets": targets,
            "all_met": all(t["met"] for t in targets)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raters", type=int, default=50, help="simulated raters, one thread and client each")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of rating (default 300)")
    p.add_argument("--think", type=float, default=1.0, help="mean pause between a rater's actions, seconds")
    p.add_argument("--no-rounds", dest="rounds", action="store_false", help="no training rounds meanwhile")
    p.add_argument("--json", default="bench/results/load.json", help="where to write the results ('' = nowhere)")
    p.add_argument("--keep", type=Path, default=None, help="keep the data folder here instead of a temp one")
    args = p.parse_args(argv)
    if args.raters < 1 or args.duration <= 0 or args.think < 0:
        raise SystemExit("--raters must be >= 1, --duration > 0, --think >= 0")
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    data_dir = args.keep or tmp / "data"
    try:
        out = run(args.raters, args.duration, args.rounds, args.think, data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = summarise(out, args.raters, args.duration, args.think, args.rounds)
    # The machine's load says how much of the latency is the app and how much is other work.
    result["command"] = "python -m bench.load " + " ".join(sys.argv[1:] if argv is None else argv)
    result["load_average_1_5_15_min_at_end"] = list(os.getloadavg())
    print_table(result["latency"], ["action", "calls", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms"],
                title=f"{args.raters} raters for {args.duration:.0f} s "
                      f"({'with' if args.rounds else 'without'} training rounds), latency through gradio_client")
    print_table(result["targets"], ["check", "value", "met"], title="targets")
    for example in result["error_examples"]:
        print("error:", example)
    write_json(args.json or None, result)
    return result


if __name__ == "__main__":
    main()
