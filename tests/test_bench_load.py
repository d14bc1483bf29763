"""The load benchmark at a tiny size: raters rate and compare through gradio_client, and every
acknowledged judgement is found in the database afterwards."""

from __future__ import annotations

import json
from pathlib import Path

from bench import load


def test_tiny_load_run_stores_every_acknowledged_judgement(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    result = load.main(["--raters", "4", "--duration", "15", "--think", "0.2", "--no-rounds", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["raters"] == 4 and saved["targets"] == result["targets"]
    r, c = result["ratings"], result["comparisons"]
    assert r["acknowledged"] > 0 and c["acknowledged"] > 0  # the raters did rate and compare
    assert r["acknowledged"] == r["stored"] and not r["missing"] and not r["wrong_value"]
    assert c["acknowledged"] == c["stored"] and not c["missing"] and not c["wrong_value"]
    assert result["errors"] == {} and result["stuck_raters"] == 0
    by_action = {row["action"]: row for row in result["latency"]}
    assert set(by_action) == set(load.ACTIONS)
    for row in by_action.values():
        assert row["calls"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    checks = {t["check"] for t in result["targets"]}
    assert "every acknowledged rating stored with its value" in checks


def test_check_finds_missing_and_changed_rows() -> None:
    acked = {1: ("a", 5, 3), 2: ("a", 6, 4), 3: ("b", 5, 1)}
    stored = {1: ("a", 5, 3), 2: ("a", 6, 5), 9: ("c", 1, 1)}
    assert load.check(acked, stored) == {"acknowledged": 3, "stored": 3, "missing": 1, "wrong_value": 1,
                                         "unacknowledged_extra": 1}
