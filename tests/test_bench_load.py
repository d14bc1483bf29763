"""The load benchmark at a tiny size: locust raters in their own process rate and compare over
Gradio's HTTP call API, and every acknowledged judgement is found in the database afterwards."""

from __future__ import annotations

import json
from pathlib import Path

from bench import load


def test_tiny_load_run_stores_every_acknowledged_judgement(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    result = load.main(["--raters", "3", "--target-raters", "3", "--duration", "12", "--think", "0.2",
                        "--no-rounds", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["targets"] == result["targets"] and (tmp_path / "load.png").exists()
    r, c = result["ratings"], result["comparisons"]
    assert r["acknowledged"] > 0 and c["acknowledged"] > 0  # the raters did rate and compare
    assert r["acknowledged"] == r["stored"] and not r["missing"] and not r["wrong_value"]
    assert c["acknowledged"] == c["stored"] and not c["missing"] and not c["wrong_value"]
    (phase,) = result["phases"]
    assert phase["raters"] == 3 and phase["errors"] == 0 and phase["busy"] == 0
    stats = result["target_phase"]
    for action in (*load.ACTIONS, "ping"):  # every action was timed, the queue's floor too
        row = stats[action]
        assert row["calls"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    checks = {t["check"]: t["met"] for t in result["targets"]}
    assert checks["every acknowledged rating stored with its value"] is True
    assert checks["no errors in any phase"] is True


def test_check_finds_missing_and_changed_rows() -> None:
    acked = [[1, "a", 5, 3], [2, "a", 6, 4], [3, "b", 5, 1], [2, "a", 6, 5]]  # rating 2 changed: the last counts
    stored = {1: ["a", 5, 3], 2: ["a", 6, 5], 9: ["c", 1, 1]}
    assert load.check(acked, stored) == {"acknowledged": 3, "stored": 3, "missing": 1, "wrong_value": 0}
    stored[1] = ["a", 5, 2]
    assert load.check(acked, stored)["wrong_value"] == 1


def test_percentile_and_stats_reading(tmp_path: Path) -> None:
    assert load.percentile([], 95) is None
    assert load.percentile([float(i) for i in range(1, 101)], 50) == 51.0
    csv = tmp_path / "x_stats.csv"
    csv.write_text("Type,Name,Request Count,Failure Count,Requests/s,50%,95%,99%\n"
                   "action,rate,10,1,2.5,80,300,N/A\nhttp,POST /call,20,0,5,1,2,3\nbusy,compare,2,0,0.5,5,6,7\n")
    assert load.read_stats(csv) == {
        "rate": {"calls": 10, "errors": 1, "per_s": 2.5, "p50_ms": 80.0, "p95_ms": 300.0, "p99_ms": None},
        "busy:compare": {"calls": 2, "errors": 0, "per_s": 0.5, "p50_ms": 5.0, "p95_ms": 6.0, "p99_ms": 7.0}}
