"""Load: a crowd rating at once, from outside the app, while rounds train; nothing acknowledged may be lost.

    python -m bench.load [--raters 10 25 50 100] [--duration 60] [--target-raters 50] [--browser]
                         [--profile] [--json bench/results/load.json]

The app runs as users run it: ``python app.py`` in its own process on a fresh data folder (the
built-in model), with a pool of 32 samples. The raters are locust users in another process
(``bench/locustfile.py``), each repeating samples_to_rate -> rate -> next_pair -> compare over
Gradio's HTTP call API with about ``--think`` seconds between actions; a rater who has rated the
whole pool leaves and a new one arrives. One more locust user times the no-op ``/ping`` through
the same queue: the floor Gradio sets.

Phases, in order: for each ``--raters`` count, ``--duration`` seconds with no round, then the
same with a round of the app's default settings running (started through ``/train_start``, as
the Train tab starts one). The ``--target-raters`` phase with a round runs until that round has
finished and its version is active. With ``--browser`` a Chromium page (Playwright) rates on the
Rate tab during that phase and times each click on a star until the next image is on screen.
With ``--profile`` py-spy samples the server during that phase (``--gil``: who holds the GIL) and
the samples are split by where the time goes (``bench/profile_split.py``).

At the end the app is stopped and its database read back: every acknowledged rating and
comparison must be stored with the value the rater sent. Reported per phase and action:
p50/p95/p99 and actions per second served; the targets in the JSON's ``targets`` list.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import print_table, write_json
from bench.gradio_call import call
from bench.load_browser import BrowserRater

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
ACTIONS = ["samples_to_rate", "rate", "next_pair", "compare"]
RATING_ACTIONS = ACTIONS  # every action a rater waits on
POOL_PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a large green circle"]
TARGET_P95_MS = 1000.0
TARGET_BROWSER_P95_MS = 1500.0
FLOOR_FACTOR = 2.0  # p50 of rate and compare within 2x the no-op's p50


class App:
    """``python app.py`` in its own process on a free port; stopped with SIGINT (Ctrl+C) at the end."""

    def __init__(self, data_dir: Path, port: int, log: Path, extra: list[str]):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(port),
                                      *extra], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the app exited at start-up (code {self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/gradio_api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise SystemExit(f"the app did not answer within 180 s; see {log}")
        self.client = httpx.Client(base_url=self.url, timeout=600)

    def call(self, name: str, *data: Any) -> Any:
        return call(self.client, name, *data)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- locust
def run_locust(url: str, raters: int, seconds: float, think: float, out: Path, name: str,
               until=None) -> dict[str, Any]:
    """One phase: ``raters`` locust raters (+1 queue-floor user) for ``seconds`` (or, with ``until``,
    until it returns true, at least ``seconds``). Stats from locust's CSV, acknowledgements from the
    locustfile."""
    prefix, acks = out / name, out / f"{name}-acks.json"
    env = {**os.environ, "LOAD_ACKS": str(acks), "LOAD_THINK_S": str(think), "PYTHONPATH": str(ROOT)}
    limit = seconds if until is None else 3600
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(raters + 1),
           "-r", str(max(1, raters // 2)), "-t", f"{int(limit)}s", "--host", url, "--csv", str(prefix),
           "--only-summary", "--reset-stats", "--stop-timeout", "5", "--loglevel", "WARNING"]
    started = time.time()
    with open(out / f"{name}-locust.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if until is not None:
                while proc.poll() is None and (time.time() - started < seconds or not until()):
                    time.sleep(1)
                proc.send_signal(signal.SIGTERM)  # locust stops its users and writes its CSV
            proc.wait(timeout=limit + 120)
        finally:  # never leave raters running (they would load the next measurement on these cores)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"name": name, "raters": raters, "seconds": round(time.time() - started, 1),
            "stats": read_stats(Path(f"{prefix}_stats.csv")), "acks": json.loads(acks.read_text())}


def read_stats(path: Path) -> dict[str, dict[str, Any]]:
    """Locust's per-name stats (request type ``action`` and ``busy``) as numbers."""
    out: dict[str, dict[str, Any]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["Type"] not in ("action", "busy"):
                continue
            key = row["Name"] if row["Type"] == "action" else f"busy:{row['Name']}"
            out[key] = {"calls": int(row["Request Count"]), "errors": int(row["Failure Count"]),
                        "per_s": float(row["Requests/s"]),
                        **{f"p{q}_ms": float(row[f"{q}%"]) if row[f"{q}%"] != "N/A" else None
                           for q in (50, 95, 99)}}
    return out


# ---------------------------------------------------------------------------------------------- rounds
class RoundKeeper:
    """A round of the app's defaults started through /train_start; finished = done and its version active."""

    def __init__(self, app: App):
        self.app = app
        self.job = app.call("train_start", {}, "")["job_id"]
        self.started = time.time()
        self.state, self.finished_s = "running", None

    def done(self) -> bool:
        status = self.app.call("train_status")
        if status["job_id"] == self.job and status["state"] not in ("queued", "running", "stopping"):
            if self.finished_s is None:
                self.state, self.finished_s = status["state"], round(time.time() - self.started, 1)
            return True
        return False

    def stop(self) -> None:
        if not self.done():
            self.app.call("train_stop", "")
            while not self.done():
                time.sleep(1)

    def outcome(self) -> dict[str, Any]:
        versions = self.app.call("versions")
        active = next((v for v in versions if v["active"]), None)
        return {"state": self.state, "seconds": self.finished_s,
                "active_version": active and active["name"], "versions": len(versions)}


# ---------------------------------------------------------------------------------------------- profile
def start_profile(pid: int, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("--profile needs py-spy (pip install py-spy); not profiling")
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--threads", "--gil",
                             "--rate", "100", "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def stop_profile(spy: subprocess.Popen, out: Path) -> dict:
    from bench.profile_split import split

    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=120)
    return split(out)


# ---------------------------------------------------------------------------------------------- checks
def stored_rows(db_path: Path) -> tuple[dict[int, list], dict[int, list]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        ratings = {r[0]: list(r[1:]) for r in db.execute(
            "SELECT id, rater_id, sample_id, stars FROM ratings WHERE rater_id LIKE 'load-%'")}
        comparisons = {r[0]: list(r[1:]) for r in db.execute(
            "SELECT id, rater_id, left_id, right_id, outcome FROM comparisons WHERE rater_id LIKE 'load-%'")}
    finally:
        db.close()
    return ratings, comparisons


def check(acked: list[list], stored: dict[int, list]) -> dict[str, int]:
    """A rating acknowledged twice (the same rater re-rating) keeps its last value."""
    last = {row[0]: row[1:] for row in acked}
    missing = [i for i in last if i not in stored]
    wrong = [i for i in last if i in stored and stored[i] != last[i]]
    return {"acknowledged": len(last), "stored": len(stored), "missing": len(missing), "wrong_value": len(wrong)}


def phase_row(phase: dict[str, Any]) -> dict[str, Any]:
    stats = phase["stats"]
    actions = {a: stats.get(a, {}) for a in RATING_ACTIONS}
    return {"phase": phase["name"], "raters": phase["raters"], "round": phase["round"], "seconds": phase["seconds"],
            "actions_per_s": round(sum(s.get("per_s", 0) for s in actions.values()), 1),
            "p95_worst_ms": max((s.get("p95_ms") or 0) for s in actions.values()),
            **{f"{a}_p50": s.get("p50_ms") for a, s in actions.items()},
            **{f"{a}_p95": s.get("p95_ms") for a, s in actions.items()},
            "ping_p50": stats.get("ping", {}).get("p50_ms"), "ping_p95": stats.get("ping", {}).get("p95_ms"),
            "errors": sum(s.get("errors", 0) for s in stats.values() if s is not None),
            "busy": sum(s["calls"] for k, s in stats.items() if k.startswith("busy:"))}


def targets(phases: list[dict], target: dict, ratings: dict, comparisons: dict, browser: dict | None,
            round_outcome: dict | None) -> list[dict]:
    s = target["stats"]
    out = []
    running = "a round running" if round_outcome else "no round"
    for action in RATING_ACTIONS:
        p95 = s.get(action, {}).get("p95_ms")
        out.append({"check": f"{target['raters']} raters, {running}: p95 of {action} under "
                             f"{TARGET_P95_MS:.0f} ms", "value": p95, "met": p95 is not None and p95 < TARGET_P95_MS})
    if round_outcome:
        out.append({"check": "the round run during the test finished and its version is active",
                    "value": f"{round_outcome['state']} after {round_outcome['seconds']} s, active: "
                             f"{round_outcome['active_version']}",
                    "met": round_outcome["state"] == "finished"
                    and round_outcome["active_version"] not in (None, "v0 (base)")})
    floor = s.get("ping", {}).get("p50_ms")
    for action in ("rate", "compare"):
        p50 = s.get(action, {}).get("p50_ms")
        out.append({"check": f"p50 of {action} within {FLOOR_FACTOR:g}x the no-op's p50 ({floor} ms)",
                    "value": p50, "met": None not in (p50, floor) and p50 <= FLOOR_FACTOR * floor})
    for what, c in (("rating", ratings), ("comparison", comparisons)):
        out.append({"check": f"every acknowledged {what} stored with its value",
                    "value": f"{c['acknowledged']} acknowledged, {c['missing']} missing, {c['wrong_value']} wrong",
                    "met": c["acknowledged"] > 0 and not c["missing"] and not c["wrong_value"]})
    errors = sum(phase_row(p)["errors"] for p in phases)
    out.append({"check": "no errors in any phase", "value": errors, "met": errors == 0})
    if browser is not None:
        p95 = percentile(browser["latency_ms"], 95)
        out.append({"check": f"browser, {target['raters']} raters, {running}: click to next image, p95 under "
                             f"{TARGET_BROWSER_P95_MS:.0f} ms", "value": p95,
                    "clicks": len(browser["latency_ms"]),
                    "met": p95 is not None and p95 < TARGET_BROWSER_P95_MS and not browser["errors"]})
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))], 1)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for with_round, style in ((False, "o-"), (True, "s--")):
        pts = sorted((r["raters"], r["p95_worst_ms"], r["ping_p95"]) for r in rows
                     if r["round"] == with_round and r["phase"].startswith("curve"))
        if pts:
            label = "a round running" if with_round else "no round"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"worst rating action p95, {label}")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], style, alpha=0.4, label=f"no-op p95, {label}")
    ax.axhline(TARGET_P95_MS, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("raters (about 1 s between actions)")
    ax.set_ylabel("p95 latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Rating latency against the crowd (built-in model, 2 CPU cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data_dir = work / "data"
    app = App(data_dir, free_port(), work / "app.log", args.app_args)
    phases: list[dict] = []
    browser_out, round_outcome, profile = None, None, None
    try:
        for i, prompt in enumerate(POOL_PROMPTS):
            app.call("generate", prompt, 8, i, 20, 3.0, None, False)
        app.call("rate", 1, 3, "setup")  # a round needs a judgement
        for raters in args.raters:
            if args.no_rounds and raters == args.target_raters:
                continue  # measured once, as the target phase below
            phases.append({**run_locust(app.url, raters, args.duration, args.think, work, f"curve-{raters}-idle"),
                           "round": False})
            if raters == args.target_raters or args.no_rounds:
                continue  # the target's round phase is below
            keeper = RoundKeeper(app)
            phases.append({**run_locust(app.url, raters, args.duration, args.think, work, f"curve-{raters}-round"),
                           "round": True})
            keeper.stop()
        keeper = None if args.no_rounds else RoundKeeper(app)
        stop = threading.Event()
        spy = start_profile(app.proc.pid, work / "profile.txt") if args.profile else None
        browser = BrowserRater(app.url, args.think, stop) if args.browser else None
        if browser:
            browser.start()
        name = f"curve-{args.target_raters}-{'idle' if keeper is None else 'round'}"
        target = {**run_locust(app.url, args.target_raters, args.duration, args.think, work, name,
                               until=keeper and keeper.done), "round": keeper is not None}
        stop.set()
        profile = {"target": stop_profile(spy, work / "profile.txt")} if spy else None
        if browser:
            browser.join(timeout=120)
            browser_out = {"latency_ms": browser.latency_ms, "errors": browser.errors}
        phases.append(target)
        round_outcome = keeper and keeper.outcome()
        if args.capacity_raters:  # no pauses, no round: what the server serves at most, and where it goes
            spy = start_profile(app.proc.pid, work / "capacity.txt") if args.profile else None
            phases.append({**run_locust(app.url, args.capacity_raters, args.duration, 0.0, work,
                                        f"capacity-{args.capacity_raters}"), "round": False})
            if spy:
                profile["capacity"] = stop_profile(spy, work / "capacity.txt")
    finally:
        app.stop()
    ratings, comparisons = stored_rows(data_dir / "feedback.db")
    acked_r = [row for p in phases for row in p["acks"]["ratings"]]
    acked_c = [row for p in phases for row in p["acks"]["comparisons"]]
    return {"phases": phases, "target": target, "round": round_outcome, "browser": browser_out,
            "profile": profile, "ratings": check(acked_r, ratings), "comparisons": check(acked_c, comparisons)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raters", type=int, nargs="+", default=[10, 25, 50, 100], help="rater counts of the curve")
    p.add_argument("--target-raters", type=int, default=50, help="the count the targets are judged at")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase (default 60)")
    p.add_argument("--think", type=float, default=1.0, help="mean pause between a rater's actions, seconds")
    p.add_argument("--browser", action="store_true", help="a Chromium rater during the target phase")
    p.add_argument("--capacity-raters", type=int, default=0,
                   help="last, a phase of this many raters with no pauses and no round: the capacity (0 = none)")
    p.add_argument("--no-rounds", action="store_true", help="no training round in any phase (a smoke run)")
    p.add_argument("--profile", action="store_true", help="py-spy the server during the target phase")
    p.add_argument("--app-args", nargs=argparse.REMAINDER, default=[], help="passed to app.py (last)")
    p.add_argument("--json", default="bench/results/load.json", help="where to write the results ('' = nowhere)")
    p.add_argument("--keep", type=Path, default=None, help="keep the work folder (logs, CSVs, data) here")
    args = p.parse_args(argv)
    if min(args.raters) < 1 or args.duration <= 0 or args.think < 0:
        raise SystemExit("--raters must be >= 1, --duration > 0, --think >= 0")
    if args.target_raters not in args.raters:
        args.raters = sorted({*args.raters, args.target_raters})
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    rows = [phase_row(ph) for ph in out["phases"]]
    checks = targets(out["phases"], out["target"], out["ratings"], out["comparisons"], out["browser"], out["round"])
    result = {"command": "python -m bench.load " + " ".join(sys.argv[1:] if argv is None else argv),
              "think_s": args.think, "phases": rows, "target_phase": out["target"]["stats"], "round": out["round"],
              "ratings": out["ratings"], "comparisons": out["comparisons"],
              "browser_click_to_next_image_ms": None if out["browser"] is None else {
                  "clicks": len(out["browser"]["latency_ms"]), "errors": out["browser"]["errors"],
                  **{f"p{q}": percentile(out["browser"]["latency_ms"], q) for q in (50, 95, 99)}},
              "profile": out["profile"], "targets": checks, "all_met": all(t["met"] for t in checks),
              "load_average_1_5_15_min_at_end": list(os.getloadavg())}
    print_table(rows, ["phase", "actions_per_s", "p95_worst_ms", "rate_p50", "rate_p95", "compare_p50",
                       "compare_p95", "samples_to_rate_p95", "next_pair_p95", "ping_p50", "ping_p95", "errors",
                       "busy"], title="latency per phase (ms), locust raters over Gradio's HTTP call API")
    for phase, split in (out["profile"] or {}).items():
        print_table(split["rows"], ["where", "share"], title=f"{phase} phase: server samples holding the GIL, by where")
    print_table(checks, ["check", "value", "met"], title="targets")
    if args.json:
        plot(rows, Path(args.json).with_suffix(".png"))
    write_json(args.json or None, result)
    return result


if __name__ == "__main__":
    main()
