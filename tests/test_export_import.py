"""Export to an imagefolder + Pick-a-Pic folder, import into a fresh store, compare everything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from feedback_store import FeedbackStore, ImportFormatError, StateError
from feedback_store.store import TABLES


def _fill(store: FeedbackStore) -> None:
    rng = np.random.default_rng(0)
    base = store.add_model_version("base", config={"steps": 0})
    child = store.add_model_version("round-1", parent_id=base, weights_path="runs/r1", metrics={"acc": 0.8})
    ids = [store.add_sample(rng.random((32, 32, 3)), p, seed=i, settings={"eta": 1.0, "steps": 20},
                            model_version_id=[base, child, None][i % 3],
                            stage_prompts=["a circle", p] if i % 2 else None)
           for i, p in enumerate(["a red circle"] * 4 + ["a small blue square, white background"] * 3)]
    store.add_sample(store.load_image(ids[0]), "a red circle")  # two samples share one image file
    for i, sid in enumerate(ids):
        store.add_rating(sid, "alice", 1 + i % 5, submission_id=f"s{i}")
        if i % 2:
            store.add_rating(sid, "bob", 5 - i % 5)
    for outcome, (a, b) in zip(["left", "right", "tie-both-good", "tie-both-bad", "skip"],
                               [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6)]):
        store.add_comparison(ids[a], ids[b], outcome, "alice", 1.25, submission_id=f"c{a}")
    store.add_comparison(ids[1], ids[0], "left", "bob")
    store.add_rater("sim-1", kind="simulated", name="bold")
    store.add_prompt_edit("a red circle", "a large red circle", stage=1, reason="bigger", rater_id="bob",
                          sample_id=ids[0])
    r = store.start_training_round(base, {"lr": 1e-4})
    store.update_training_round(r, 0.4, {"loss": 0.3})
    store.finish_training_round(r, child, {"win_rate": 0.7})
    store.fail_training_round(store.start_training_round(child), "stopped by the user")


@pytest.fixture
def exported(tmp_path):
    with FeedbackStore(tmp_path / "src") as src:
        _fill(src)
        out = src.export_folder(tmp_path / "export")
        yield src, out


def _table_rows(store: FeedbackStore, table: str) -> list[dict]:
    return list(store.db[table].rows_where(order_by="id"))


def test_round_trip_every_row_and_image(exported, tmp_path):
    src, out = exported
    with FeedbackStore(tmp_path / "dst") as dst:
        counts = dst.import_folder(out)
        assert counts == src.counts() and all(counts.values())
        for table in TABLES:
            assert _table_rows(dst, table) == _table_rows(src, table), table
        for sample in _table_rows(src, "samples"):
            assert (dst.images.path(sample["image_path"]).read_bytes()
                    == src.images.path(sample["image_path"]).read_bytes())
        assert dst.verify() == []
        assert dst.version_stats() == src.version_stats()


def test_export_layout_is_imagefolder_and_pick_a_pic(exported):
    src, out = exported
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == src.counts()["samples"]
    assert all((out / m["file_name"]).is_file() and m["file_name"].startswith("images/") for m in meta)
    assert meta[0]["text"] == "a red circle" and meta[1]["model_version"] == "round-1"
    cmps = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    by_outcome = {c["outcome"]: c for c in cmps if c["user_id"] == "alice"}
    uid = {m["id"]: m["uid"] for m in meta}
    left = by_outcome["left"]
    assert (left["label_0"], left["label_1"], left["best_image_uid"]) == (1.0, 0.0, uid[left["left_id"]])
    assert by_outcome["right"]["best_image_uid"] == uid[by_outcome["right"]["right_id"]]
    assert (by_outcome["tie-both-bad"]["label_0"], by_outcome["tie-both-bad"]["label_1"]) == (0.5, 0.5)
    assert by_outcome["skip"]["has_label"] is False and by_outcome["skip"]["label_0"] is None
    assert (out / left["image_0_file"]).is_file() and left["caption"] == "a red circle"


def _assert_unchanged(store: FeedbackStore) -> None:
    assert not any(store.counts().values())
    assert not list(store.images.root.rglob("*.png"))


def _corrupt_jsonl(out: Path, name: str, edit) -> None:
    """Edit rows of one file and refresh its manifest checksum (a well-formed but wrong folder)."""
    from feedback_store.images import sha256

    rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
    text = "".join(json.dumps(r) + "\n" for r in edit(rows))
    (out / name).write_text(text)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = sha256(text.encode())
    (out / "manifest.json").write_text(json.dumps(manifest))


def _first(rows: list[dict], **changes) -> list[dict]:
    return [{**rows[0], **changes}] + rows[1:]


MALFORMED = {
    "no manifest": (lambda out: (out / "manifest.json").unlink(), "no manifest.json"),
    "not json": (lambda out: (out / "manifest.json").write_text("{oops"), "not valid JSON"),
    "newer format": (lambda out: (out / "manifest.json").write_text(json.dumps(
        {**json.loads((out / "manifest.json").read_text()), "format_version": 99})), "not supported"),
    "truncated table": (lambda out: (out / "ratings.jsonl").write_text(
        (out / "ratings.jsonl").read_text().split("\n", 1)[1]), "checksum"),
    "missing image": (lambda out: next((out / "images").iterdir()).unlink(), "missing"),
    "image swapped": (lambda out: [p.write_bytes(b"\x89PNG not really") for p in (out / "images").iterdir()],
                      "does not match its hash"),
    "bad stars": (lambda out: _corrupt_jsonl(out, "ratings.jsonl", lambda r: _first(r, stars=9)), "1 to 5"),
    "bad outcome": (lambda out: _corrupt_jsonl(out, "comparisons.jsonl", lambda r: _first(r, outcome="meh")),
                    "outcome"),
    "dangling reference": (lambda out: _corrupt_jsonl(out, "ratings.jsonl", lambda r: _first(r, sample_id=999)),
                           "not there"),
    "missing column": (lambda out: _corrupt_jsonl(out, "prompts.jsonl",
                                                  lambda r: [{k: v for k, v in r[0].items() if k != "text"}]
                                                  + r[1:]), "no 'text'"),
    "wrong type": (lambda out: _corrupt_jsonl(out, "ratings.jsonl", lambda r: _first(r, stars="5")),
                   "wrong type"),
    "repeated id": (lambda out: _corrupt_jsonl(out, "raters.jsonl", lambda r: r + r[:1]), "repeats an id"),
    # Passes every Python check but breaks a UNIQUE constraint: the transaction must roll back.
    "duplicate rating": (lambda out: _corrupt_jsonl(out, "ratings.jsonl",
                                                    lambda r: r + [{**r[0], "id": 999, "submission_id": None}]),
                         "refused"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_folder_is_refused_and_changes_nothing(exported, tmp_path, case):
    src, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    breaker, message = MALFORMED[case]
    breaker(bad)
    with FeedbackStore(tmp_path / "dst") as dst:
        with pytest.raises(ImportFormatError, match=message) as info:
            dst.import_folder(bad)
        assert "Nothing was imported" in str(info.value)
        _assert_unchanged(dst)


def test_import_needs_an_empty_store(exported, tmp_path):
    src, out = exported
    with pytest.raises(StateError, match="empty store"):
        src.import_folder(out)
    with pytest.raises(ImportFormatError, match="not a folder"):
        src.import_folder(tmp_path / "nowhere")


def test_export_refuses_a_non_empty_folder(exported, tmp_path):
    src, out = exported
    with pytest.raises(Exception, match="not empty"):
        src.export_folder(out)
