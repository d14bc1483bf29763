"""FeedbackStore on real temporary SQLite databases: writes, validation, duplicates, queries."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from feedback_store import (
    SCHEMA_VERSION,
    DuplicateError,
    FeedbackStore,
    NotFoundError,
    SchemaError,
    StateError,
    StoreError,
    ValidationError,
)
from feedback_store.schema import MIGRATIONS


def image(i: int) -> np.ndarray:
    return np.random.default_rng(i).random((32, 32, 3), dtype=np.float32)


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "data") as s:
        yield s


@pytest.fixture
def world(store):
    """Two model versions (child of base) and 4 samples of one prompt from each."""
    base = store.add_model_version("base", config={"lr": 0})
    child = store.add_model_version("round-1", parent_id=base, weights_path="w/r1")
    samples = {v: [store.add_sample(image(10 * v + i), "a red circle", seed=i, settings={"steps": 20},
                                    model_version_id=v) for i in range(4)] for v in (base, child)}
    return store, base, child, samples


def test_sample_round_trip_and_files(store):
    vid = store.add_model_version("base")
    sid = store.add_sample(image(0), "a red circle", seed=7, settings={"steps": 20, "eta": 1.0},
                           model_version_id=vid, stage_prompts=["a circle", "a red circle"])
    s = store.get_sample(sid)
    assert (s["prompt"], s["seed"], s["model_version_id"]) == ("a red circle", 7, vid)
    assert s["sampler_settings"] == {"steps": 20, "eta": 1.0}
    assert s["stage_prompts"] == ["a circle", "a red circle"]
    assert np.abs(np.asarray(store.load_image(sid), np.float32) / 255 - image(0)).max() <= 0.5 / 255 + 1e-6
    # Content addressed, no temporary files left behind, the PIL path works too.
    assert s["image_path"].endswith(s["image_sha256"] + ".png")
    sid2 = store.add_sample(Image.open(s["image_file"]), "a red circle")
    assert store.get_sample(sid2)["image_sha256"] == s["image_sha256"]
    assert not list(store.data_dir.rglob(".tmp-*"))
    assert store.verify() == []
    assert store.schema_version == SCHEMA_VERSION


def test_bad_input_raises_clear_errors_and_changes_nothing(world):
    store, base, child, samples = world
    sid = samples[base][0]
    store.add_rating(sid, "alice", 4)
    before = store.counts()
    bad_calls = [
        (NotFoundError, lambda: store.add_rating(10_000, "alice", 3), "no sample"),
        (ValidationError, lambda: store.add_rating(sid, "bob", 6), "1 to 5"),
        (ValidationError, lambda: store.add_rating(sid, "bob", 0), "1 to 5"),
        (ValidationError, lambda: store.add_rating(sid, "bob", 3.5), "1 to 5"),
        (ValidationError, lambda: store.add_rating(sid, "", 3), "rater id"),
        (ValidationError, lambda: store.add_comparison(sid, sid, "left", "bob"), "two different"),
        (ValidationError, lambda: store.add_comparison(sid, samples[child][0], "maybe", "bob"), "outcome"),
        (ValidationError, lambda: store.add_comparison(sid, samples[child][0], "left", "bob", -1.0), "seconds"),
        (NotFoundError, lambda: store.add_comparison(sid, 10_000, "left", "bob"), "no sample"),
        (NotFoundError, lambda: store.add_sample(image(1), "a red circle", model_version_id=99), "model"),
        (ValidationError, lambda: store.add_sample(image(1), ""), "prompt"),
        (ValidationError, lambda: store.add_sample(np.zeros((4, 4, 7)), "a red circle"), "image"),
        (ValidationError, lambda: store.add_sample(image(1), "x", settings={"a": float("nan")}), "NaN"),
        (NotFoundError, lambda: store.add_model_version("x", parent_id=99), "parent"),
        (NotFoundError, lambda: store.add_prompt_edit("a", "b", sample_id=99), "sample"),
        (DuplicateError, lambda: store.add_rating(sid, "alice", 5), "already gave"),
    ]
    for cls, call, words in bad_calls:
        with pytest.raises(cls, match=words) as info:
            call()
        assert isinstance(info.value, StoreError)
        assert store.counts() == before, f"{cls.__name__} changed the store"
    assert len(list(store.images.root.rglob("*.png"))) == 8  # no orphan image from the bad sample


def test_duplicates_and_submission_ids(world):
    store, base, child, samples = world
    a, b = samples[base][0], samples[child][0]
    first = store.add_rating(a, "alice", 4, submission_id="sub-1")
    assert store.add_rating(a, "alice", 4, submission_id="sub-1") == first  # a resend: no-op
    with pytest.raises(DuplicateError, match="different") as info:
        store.add_rating(b, "alice", 2, submission_id="sub-1")
    assert info.value.existing_id == first
    with pytest.raises(DuplicateError, match="already gave"):
        store.add_rating(a, "alice", 2)
    assert store.add_rating(a, "alice", 2, replace=True) == first  # changing one's mind is explicit
    assert store.counts()["ratings"] == 1
    assert store.rater_stats()[0]["mean_stars"] == 2

    c = store.add_comparison(a, b, "left", "alice", 1.5, submission_id="cmp-1")
    assert store.add_comparison(a, b, "left", "alice", 1.5, submission_id="cmp-1") == c
    with pytest.raises(DuplicateError, match="already compared"):
        store.add_comparison(b, a, "right", "alice")  # same unordered pair, other sides
    assert store.add_comparison(b, a, "left", "alice", replace=True) == c
    assert store.counts()["comparisons"] == 1


def test_next_samples_to_rate_newest_version_first(world):
    store, base, child, samples = world
    first = store.next_samples_to_rate("alice", limit=3)
    assert [s["model_version_id"] for s in first] == [child] * 3
    for s in samples[child]:
        store.add_rating(s, "alice", 3)
    rest = store.next_samples_to_rate("alice", limit=10)
    assert {s["id"] for s in rest} == set(samples[base])
    assert store.next_samples_to_rate("bob", limit=100, model_version_id=base)[0]["model_version_id"] == base
    # Least-rated first for a new rater: bob gets base samples nobody rated before rated ones.
    store.add_rating(samples[base][0], "carol", 5)
    order = [s["id"] for s in store.next_samples_to_rate("bob", limit=10, model_version_id=base)]
    assert order[-1] == samples[base][0]


def test_next_pair_covers_all_pairs_once(world):
    store, base, child, samples = world
    rng = random.Random(0)
    first = store.next_pair("alice", rng=rng)
    assert first.left_version != first.right_version  # default: cross-version pairs first
    seen = set()
    while (pair := store.next_pair("alice", rng=rng)) is not None:
        key = frozenset((pair.left_id, pair.right_id))
        assert key not in seen and pair.left_path.exists()
        seen.add(key)
        store.add_comparison(pair.left_id, pair.right_id, rng.choice(["left", "right", "skip"]), "alice")
    assert len(seen) == 8 * 7 // 2
    assert store.next_pair("bob", prompt="a blue square") is None


def test_next_pair_uses_scorer(world):
    store, base, child, samples = world
    target = {samples[base][2], samples[base][3]}
    pair = store.next_pair("alice", scorer=lambda cands: [
        1.0 if {c.left_id, c.right_id} == target else 0.0 for c in cands])
    assert {pair.left_id, pair.right_id} == target


def test_version_stats_win_rate_over_parent(world):
    store, base, child, samples = world
    outcomes = ["left", "left", "right", "tie-both-good", "skip"]  # child on the left each time
    for i, outcome in enumerate(outcomes):
        store.add_comparison(samples[child][i % 4], samples[base][(i + 1) % 4] if i == 4 else samples[base][i % 4],
                             outcome, f"r{i}")
    store.add_comparison(samples[base][1], samples[child][1], "left", "r9")  # parent wins, sides swapped
    # not a before/after pair (other noise): it says nothing about the round, so it does not count
    store.add_comparison(samples[child][2], samples[base][3], "left", "r10")
    store.add_rating(samples[child][0], "alice", 5)
    store.add_rating(samples[child][1], "alice", 3)
    stats = {s["version_id"]: s for s in store.version_stats()}
    assert stats[child]["mean_stars"] == 4 and stats[child]["n_ratings"] == 2 and stats[child]["n_samples"] == 4
    assert (stats[child]["wins_vs_parent"], stats[child]["losses_vs_parent"], stats[child]["ties_vs_parent"]) \
        == (2, 2, 1)
    assert stats[child]["win_rate_vs_parent"] == pytest.approx(2.5 / 5)
    assert stats[base]["win_rate_vs_parent"] is None


def test_rater_stats_and_agreement(world):
    store, base, child, samples = world
    s = samples[base]
    for i, stars in enumerate([5, 4, 2, 1]):
        store.add_rating(s[i], "alice", stars)
    for i, stars in enumerate([5, 3, 2, 2]):
        store.add_rating(s[i], "bob", stars)
    store.add_comparison(s[0], s[1], "left", "alice", 2.0)
    store.add_comparison(s[1], s[0], "right", "bob", 4.0)  # same answer, sides swapped
    store.add_comparison(s[2], s[3], "tie-both-bad", "alice", 1.0)
    store.add_comparison(s[2], s[3], "left", "bob")
    store.add_comparison(s[0], s[3], "skip", "bob")
    stats = {r["rater_id"]: r for r in store.rater_stats()}
    assert stats["alice"]["star_histogram"] == {1: 1, 2: 1, 3: 0, 4: 1, 5: 1}
    assert stats["bob"]["skip_rate"] == pytest.approx(1 / 3)
    assert stats["alice"]["median_response_time_s"] == pytest.approx(1.5)
    (agree,) = store.rater_agreement()
    assert (agree["rater_a"], agree["rater_b"], agree["n_common_ratings"]) == ("alice", "bob", 4)
    assert agree["stars_exact_agreement"] == pytest.approx(0.5)
    assert agree["stars_within_one"] == pytest.approx(1.0)
    assert agree["n_common_pairs"] == 2 and agree["pair_agreement"] == pytest.approx(0.5)
    assert store.rater_agreement(min_overlap=5) == []


def test_training_round_lifecycle(world):
    store, base, child, samples = world
    r = store.start_training_round(base, {"steps": 10})
    store.update_training_round(r, 0.5, {"loss": 1.0})
    store.finish_training_round(r, output_version_id=child, metrics={"reward": 2.0})
    row = store.get_training_round(r)
    assert (row["state"], row["progress"], row["output_version_id"]) == ("finished", 1.0, child)
    assert row["metrics"] == {"loss": 1.0, "reward": 2.0}
    with pytest.raises(StateError):
        store.update_training_round(r, 0.7)
    with pytest.raises(ValidationError):
        store.update_training_round(store.start_training_round(), 1.5)
    r2 = store.start_training_round(child)
    store.fail_training_round(r2, "out of memory")
    assert store.get_training_round(r2)["error"] == "out of memory"
    r3 = store.start_training_round(child)
    assert store.mark_interrupted_rounds_failed() == 2  # the one from the ValidationError check, and r3
    assert store.get_training_round(r3)["state"] == "failed"
    assert store.training_rounds(state="running") == []


def test_model_versions_and_prompt_edits(world):
    store, base, child, samples = world
    store.update_model_version(child, metrics={"win_rate": 0.6}, weights_path="w/r1b")
    v = store.get_model_version(child)
    assert (v["parent_id"], v["weights_path"], v["metrics"]) == (base, "w/r1b", {"win_rate": 0.6})
    e = store.add_prompt_edit("a red circle", "a large red circle", stage=2, reason="too small",
                              rater_id="alice", sample_id=samples[child][0])
    assert store.db["prompt_edits"].get(e)["reason"] == "too small"
    assert store.add_prompt("a red circle") == store.get_sample(samples[base][0])["prompt_id"]


def test_reopen_is_idempotent_and_newer_schema_is_refused(tmp_path):
    FeedbackStore(tmp_path).close()
    with FeedbackStore(tmp_path) as s:
        assert s.schema_version == SCHEMA_VERSION
        s.db[MIGRATIONS.migrations_table].insert(
            {"migration_set": "feedback_store", "name": "9999_from_the_future", "applied_at": "x"})
    with pytest.raises(SchemaError, match="newer version"):
        FeedbackStore(tmp_path)


def test_preference_records(world):
    store, base, child, samples = world
    a, b, c = samples[base][:3]
    store.add_comparison(a, b, "left", "alice")
    store.add_comparison(b, c, "tie-both-good", "alice")
    store.add_comparison(a, c, "skip", "alice")
    store.add_rating(c, "bob", 2)
    rec = store.preference_records()
    assert rec.comparisons == [(a, b, 1.0), (b, c, 0.5)]
    assert rec.ratings == [(c, 2)]
    assert set(rec.samples) == {a, b, c} and rec.samples[a]["path"].exists()
    assert store.preference_records(["bob"]).comparisons == []


def test_small_lookups_the_app_reads(world):
    store, base, child, samples = world
    s0, s1 = samples[base][0], samples[child][0]
    store.add_rating(s0, "ann", 4)
    assert store.star_rating(s0, "ann") == 4 and store.star_rating(s0, "bob") is None
    store.add_comparison(s0, s1, "left", "ann")
    assert store.comparison_counts("ann") == {"my_comparisons": 1, "all_comparisons": 1}
    assert store.comparison_counts(None) == {"my_comparisons": 0, "all_comparisons": 1}
    assert store.noise_settings([s0, s1]) == {s0: (0, {"steps": 20}), s1: (0, {"steps": 20})}
    assert store.noise_settings([]) == {}

    store.add_sample(image(99), "a blue square", seed=1, settings={"origin": "round"})
    assert store.prompts_people_used() == ["a red circle"]  # a round's own samples are not people's
    store.add_prompt_edit("a red circle", "a shape", stage=0)
    store.add_prompt_edit("a red circle", "a circle", stage=1)
    store.add_prompt_edit("a red circle", "a round shape", stage=0)  # the latest edit of a stage wins
    store.add_prompt_edit("a red circle", "a big red circle")
    assert store.saved_stage_prompts() == {"a red circle": {0: "a round shape", 1: "a circle"}}
    assert store.edited_prompts() == ["a big red circle"]
