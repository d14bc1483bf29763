"""FeedbackStore: the app's one door to prompts, samples, ratings, comparisons and models.

Thread- and process-safe: every thread gets its own SQLite connection, every write is one
short ``BEGIN IMMEDIATE`` transaction (retried on SQLITE_BUSY), and any number of processes
may open the same data directory.

Duplicate submissions (decided here, documented in docs/store.md):
- A rater has at most one star rating per sample and one comparison per unordered pair.
  A second one raises ``DuplicateError`` unless ``replace=True`` (a rater changing their mind).
- A client may pass ``submission_id`` (e.g. a UUID made when the widget is shown). Resending
  the same submission with the same answer returns the original row id and changes nothing
  (safe network retries and double clicks); reusing it for a different answer raises
  ``DuplicateError``.
"""

from __future__ import annotations

import collections
import json
import random
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from sqlite_utils import Database

from feedback_store import db as dbmod
from feedback_store import queries
from feedback_store import validation as v
from feedback_store.errors import DuplicateError, NotFoundError, StateError
from feedback_store.images import ImageFiles, encode_png, to_pil
from feedback_store.queries import PairCandidate, PreferenceRecords
from feedback_store.schema import migrate, schema_version

DB_NAME = "feedback.db"


class _FifoLock:
    """A first-come-first-served lock that hands ownership straight to the next waiter.
    (``threading.Lock`` is not fair: under load some writers starve, which shows in p99.)"""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def __enter__(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()

    def __exit__(self, *exc: object) -> None:
        with self._guard:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False


# One write lock per database file per process: threads of one process queue here (woken at
# once on release) instead of polling in SQLite's busy handler, which sleeps up to 100 ms per try.
# Other processes still queue through SQLite's own lock (busy_timeout + retry).
_WRITE_LOCKS: dict[Path, _FifoLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()
TABLES = ("raters", "prompts", "model_versions", "samples", "ratings", "comparisons",
          "prompt_edits", "training_rounds")
_JSON_COLUMNS = ("config", "metrics", "sampler_settings")


def _insert(db: Database, table: str, row: dict[str, Any]) -> int:
    """Plain INSERT for the hot paths (ratings, comparisons): sqlite-utils' ``insert`` runs about
    ten schema-introspection queries per call, which made up two thirds of a rating's write time."""
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    return db.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values())).lastrowid


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Turn a row's JSON text columns back into Python values."""
    out = dict(row)
    for key in _JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    if isinstance(out.get("stage_prompts"), str):
        out["stage_prompts"] = json.loads(out["stage_prompts"])
    return out


class FeedbackStore:
    """``FeedbackStore(data_dir)``: ``data_dir/feedback.db`` plus ``data_dir/images/``."""

    def __init__(self, data_dir: str | Path, synchronous: str = "NORMAL"):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / DB_NAME
        self.images = ImageFiles(self.data_dir)
        self._synchronous = synchronous
        self._local = threading.local()
        self._conns: list[Database] = []
        self._conns_lock = threading.Lock()
        with _WRITE_LOCKS_GUARD:
            self._write_lock = _WRITE_LOCKS.setdefault(self.db_path.resolve(), _FifoLock())
        dbmod.enable_wal(self.db)
        migrate(self.db)

    # ----------------------------------------------------------------- connections
    @property
    def db(self) -> Database:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = dbmod.connect(self.db_path, self._synchronous)
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def close(self) -> None:
        with self._conns_lock:
            for db in self._conns:
                db.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn: Callable[[Database], Any]) -> Any:
        try:
            with self._write_lock:
                return dbmod.write(self.db, fn)
        except sqlite3.IntegrityError as err:  # a CHECK/FK the Python checks should have caught
            raise v.ValidationError(f"the database refused this change: {err}") from err

    @property
    def schema_version(self) -> int:
        return schema_version(self.db)

    # ----------------------------------------------------------------- lookups
    def _require(self, db: Database, table: str, row_id: Any, what: str) -> dict[str, Any]:
        rows = list(db[table].rows_where("id = ?", [row_id], limit=1))
        if not rows:
            raise NotFoundError(f"there is no {what} with id {row_id!r}")
        return rows[0]

    def get_sample(self, sample_id: int) -> dict[str, Any]:
        """A sample with its prompt text, decoded settings and absolute image path."""
        v.identifier(sample_id, "sample id")
        rows = list(self.db.query(
            "SELECT s.*, p.text AS prompt FROM samples s JOIN prompts p ON p.id = s.prompt_id "
            "WHERE s.id = ?", [sample_id]))
        if not rows:
            raise NotFoundError(f"there is no sample with id {sample_id!r}")
        row = decode_row(rows[0])
        row["image_file"] = str(self.images.path(row["image_path"]))
        return row

    def image_path(self, sample_id: int) -> Path:
        return Path(self.get_sample(sample_id)["image_file"])

    def load_image(self, sample_id: int) -> Image.Image:
        with Image.open(self.image_path(sample_id)) as im:
            return im.convert("RGB")

    def get_model_version(self, version_id: int) -> dict[str, Any]:
        return decode_row(self._require(self.db, "model_versions", v.identifier(version_id, "version id"),
                                        "model version"))

    def model_versions(self) -> list[dict[str, Any]]:
        return [decode_row(r) for r in self.db["model_versions"].rows_where(order_by="id")]

    def get_training_round(self, round_id: int) -> dict[str, Any]:
        return decode_row(self._require(self.db, "training_rounds", v.identifier(round_id, "round id"),
                                        "training round"))

    def training_rounds(self, state: str | None = None) -> list[dict[str, Any]]:
        where, args = ("state = ?", [state]) if state else (None, None)
        return [decode_row(r) for r in self.db["training_rounds"].rows_where(where, args, order_by="id")]

    def counts(self) -> dict[str, int]:
        return {t: self.db[t].count for t in TABLES}

    # ----------------------------------------------------------------- raters, prompts, versions
    @staticmethod
    def _ensure_rater(db: Database, rater_id: str, kind: str = "person", name: str | None = None) -> None:
        db.conn.execute("INSERT OR IGNORE INTO raters (id, kind, name, created_at) VALUES (?, ?, ?, ?)",
                        [rater_id, kind, name, v.now()])

    def add_rater(self, rater_id: str, kind: str = "person", name: str | None = None) -> str:
        """Register a rater (a person, an anonymous session, or a simulated one). Idempotent."""
        v.rater(rater_id)
        if kind not in ("person", "session", "simulated"):
            raise v.ValidationError(f"rater kind must be person, session or simulated; got {kind!r}")
        self._write(lambda db: self._ensure_rater(db, rater_id, kind, v.optional_text(name, "rater name")))
        return rater_id

    @staticmethod
    def _prompt_id(db: Database, text: str) -> int:
        rows = list(db["prompts"].rows_where("text = ?", [text], select="id", limit=1))
        if rows:
            return rows[0]["id"]
        return db["prompts"].insert({"text": text, "created_at": v.now()}).last_pk

    def add_prompt(self, text: str) -> int:
        """The id of ``text`` in the prompts table, adding it if new."""
        v.text(text, "prompt")
        return self._write(lambda db: self._prompt_id(db, text))

    def add_model_version(self, name: str, parent_id: int | None = None, weights_path: str | None = None,
                          config: dict | None = None, metrics: dict | None = None) -> int:
        row = {"name": v.text(name, "model version name", 200),
               "parent_id": None if parent_id is None else v.identifier(parent_id, "parent version id"),
               "weights_path": None if weights_path is None else str(weights_path),
               "config": v.json_object(config, "model config"),
               "metrics": v.json_object(metrics, "model metrics"), "created_at": v.now()}

        def tx(db: Database) -> int:
            if parent_id is not None:
                self._require(db, "model_versions", parent_id, "model version (parent)")
            return db["model_versions"].insert(row).last_pk

        return self._write(tx)

    def update_model_version(self, version_id: int, metrics: dict | None = None,
                             weights_path: str | None = None) -> None:
        """Merge ``metrics`` into the version's metrics and/or set its weights path."""
        v.identifier(version_id, "version id")
        v.json_object(metrics, "model metrics")

        def tx(db: Database) -> None:
            row = self._require(db, "model_versions", version_id, "model version")
            updates: dict[str, Any] = {}
            if metrics:
                updates["metrics"] = v.json_object({**json.loads(row["metrics"]), **metrics}, "metrics")
            if weights_path is not None:
                updates["weights_path"] = str(weights_path)
            if updates:
                db["model_versions"].update(version_id, updates)

        self._write(tx)

    # ----------------------------------------------------------------- samples
    def add_sample(self, image: Any, prompt: str, seed: int | None = None, settings: dict | None = None,
                   model_version_id: int | None = None, stage_prompts: Sequence[str] | None = None) -> int:
        """Store an image (PIL, HxWx3 array, or 3xHxW tensor) and its provenance; return its id.

        The PNG is written (atomically) before the row, so no row ever points at a missing file."""
        v.text(prompt, "prompt")
        row = {"seed": v.seed(seed), "sampler_settings": v.json_object(settings, "sampler settings"),
               "stage_prompts": v.stage_prompts(stage_prompts),
               "model_version_id": None if model_version_id is None
               else v.identifier(model_version_id, "model version id")}
        try:
            pil = to_pil(image)
        except ValueError as err:
            raise v.ValidationError(f"cannot store this image: {err}") from err
        if model_version_id is not None:  # check first so a bad id does not leave a file behind
            self._require(self.db, "model_versions", model_version_id, "model version")
        digest, rel = self.images.put(encode_png(pil))

        def tx(db: Database) -> int:
            return db["samples"].insert({
                **row, "uid": uuid.uuid4().hex, "prompt_id": self._prompt_id(db, prompt),
                "image_sha256": digest, "image_path": rel, "width": pil.width, "height": pil.height,
                "created_at": v.now()}).last_pk

        return self._write(tx)

    # ----------------------------------------------------------------- judgements
    @staticmethod
    def _by_submission(db: Database, table: str, submission_id: str | None) -> dict | None:
        if submission_id is None:
            return None
        rows = list(db[table].rows_where("submission_id = ?", [submission_id], limit=1))
        return rows[0] if rows else None

    def add_rating(self, sample_id: int, rater_id: str, stars: int, submission_id: str | None = None,
                   replace: bool = False) -> int:
        """Record ``stars`` (1-5) from ``rater_id`` for a sample; return the rating's id."""
        v.identifier(sample_id, "sample id")
        v.rater(rater_id)
        v.stars(stars)
        v.optional_text(submission_id, "submission id", 200)

        def tx(db: Database) -> int:
            prior = self._by_submission(db, "ratings", submission_id)
            if prior is not None:
                if (prior["sample_id"], prior["rater_id"], prior["stars"]) == (sample_id, rater_id, stars):
                    return prior["id"]  # a resend of the same answer: nothing to do
                raise DuplicateError(f"submission {submission_id!r} was already used for a different "
                                     "rating; nothing was changed", prior["id"])
            self._require(db, "samples", sample_id, "sample")
            self._ensure_rater(db, rater_id)
            existing = list(db["ratings"].rows_where("rater_id = ? AND sample_id = ?",
                                                     [rater_id, sample_id], limit=1))
            now = v.now()
            if existing:
                old = existing[0]
                if not replace:
                    raise DuplicateError(
                        f"rater {rater_id!r} already gave sample {sample_id} {old['stars']} stars; "
                        "nothing was changed (pass replace=True to change a rating)", old["id"])
                db["ratings"].update(old["id"], {
                    "stars": stars, "updated_at": now,
                    "submission_id": old["submission_id"] if submission_id is None else submission_id})
                return old["id"]
            return _insert(db, "ratings", {"sample_id": sample_id, "rater_id": rater_id, "stars": stars,
                                           "submission_id": submission_id, "created_at": now,
                                           "updated_at": now})

        return self._write(tx)

    def add_comparison(self, left_id: int, right_id: int, outcome: str, rater_id: str,
                       response_time_s: float | None = None, submission_id: str | None = None,
                       replace: bool = False) -> int:
        """Record a pairwise judgement: outcome is left, right, tie-both-good, tie-both-bad or skip."""
        v.identifier(left_id, "left sample id")
        v.identifier(right_id, "right sample id")
        if left_id == right_id:
            raise v.ValidationError("a comparison needs two different samples")
        v.outcome(outcome)
        v.rater(rater_id)
        rt = v.response_time(response_time_s)
        v.optional_text(submission_id, "submission id", 200)
        answer = (left_id, right_id, outcome, rater_id)

        def tx(db: Database) -> int:
            prior = self._by_submission(db, "comparisons", submission_id)
            if prior is not None:
                if (prior["left_id"], prior["right_id"], prior["outcome"], prior["rater_id"]) == answer:
                    return prior["id"]
                raise DuplicateError(f"submission {submission_id!r} was already used for a different "
                                     "comparison; nothing was changed", prior["id"])
            self._require(db, "samples", left_id, "sample (left)")
            self._require(db, "samples", right_id, "sample (right)")
            self._ensure_rater(db, rater_id)
            existing = list(db["comparisons"].rows_where(
                "rater_id = ? AND min(left_id, right_id) = ? AND max(left_id, right_id) = ?",
                [rater_id, min(left_id, right_id), max(left_id, right_id)], limit=1))
            now = v.now()
            row = {"left_id": left_id, "right_id": right_id, "outcome": outcome, "rater_id": rater_id,
                   "response_time_s": rt, "submission_id": submission_id, "updated_at": now}
            if existing:
                old = existing[0]
                if not replace:
                    raise DuplicateError(
                        f"rater {rater_id!r} already compared samples {left_id} and {right_id} "
                        f"({old['outcome']}); nothing was changed (pass replace=True to change it)",
                        old["id"])
                if submission_id is None:
                    row["submission_id"] = old["submission_id"]
                db["comparisons"].update(old["id"], row)
                return old["id"]
            return _insert(db, "comparisons", {**row, "created_at": now})

        return self._write(tx)

    def add_prompt_edit(self, original: str, edited: str, stage: int | None = None,
                        reason: str | None = None, rater_id: str | None = None,
                        sample_id: int | None = None) -> int:
        """Record that a person rewrote a prompt (optionally one DCoT stage of it), and why."""
        row = {"original": v.text(original, "original prompt"), "edited": v.text(edited, "edited prompt"),
               "stage": None if stage is None else v.identifier(stage, "stage"),
               "reason": v.optional_text(reason, "reason"),
               "rater_id": None if rater_id is None else v.rater(rater_id),
               "sample_id": None if sample_id is None else v.identifier(sample_id, "sample id"),
               "created_at": v.now()}

        def tx(db: Database) -> int:
            if sample_id is not None:
                self._require(db, "samples", sample_id, "sample")
            if rater_id is not None:
                self._ensure_rater(db, rater_id)
            return db["prompt_edits"].insert(row).last_pk

        return self._write(tx)

    # ----------------------------------------------------------------- training rounds
    def start_training_round(self, base_version_id: int | None = None, config: dict | None = None) -> int:
        now = v.now()
        row = {"base_version_id": base_version_id, "state": "running", "progress": 0.0,
               "config": v.json_object(config, "training config"), "metrics": "{}",
               "started_at": now, "updated_at": now}

        def tx(db: Database) -> int:
            if base_version_id is not None:
                self._require(db, "model_versions", v.identifier(base_version_id, "version id"),
                              "model version")
            return db["training_rounds"].insert(row).last_pk

        return self._write(tx)

    def _update_running(self, round_id: int, updates: dict[str, Any], merge_metrics: dict | None) -> None:
        v.identifier(round_id, "round id")
        v.json_object(merge_metrics, "training metrics")

        def tx(db: Database) -> None:
            row = self._require(db, "training_rounds", round_id, "training round")
            if row["state"] != "running":
                raise StateError(f"training round {round_id} is {row['state']}, not running")
            if updates.get("output_version_id") is not None:
                self._require(db, "model_versions", updates["output_version_id"], "model version")
            metrics = {**json.loads(row["metrics"]), **(merge_metrics or {})}
            db["training_rounds"].update(round_id, {**updates, "metrics": json.dumps(metrics, sort_keys=True),
                                                    "updated_at": v.now()})

        self._write(tx)

    def update_training_round(self, round_id: int, progress: float, metrics: dict | None = None) -> None:
        self._update_running(round_id, {"progress": v.progress(progress)}, metrics)

    def finish_training_round(self, round_id: int, output_version_id: int | None = None,
                              metrics: dict | None = None) -> None:
        self._update_running(round_id, {"state": "finished", "progress": 1.0,
                                        "output_version_id": output_version_id,
                                        "finished_at": v.now()}, metrics)

    def fail_training_round(self, round_id: int, error: str) -> None:
        self._update_running(round_id, {"state": "failed", "error": v.text(error, "error message"),
                                        "finished_at": v.now()}, None)

    def mark_interrupted_rounds_failed(self, error: str = "interrupted: the app stopped while this "
                                       "round was running") -> int:
        """On app start: no round can still be running, so mark any 'running' one failed."""
        def tx(db: Database) -> int:
            now = v.now()
            cur = db.execute("UPDATE training_rounds SET state = 'failed', error = ?, updated_at = ?, "
                             "finished_at = ? WHERE state = 'running'", [error, now, now])
            return cur.rowcount

        return self._write(tx)

    # ----------------------------------------------------------------- queries for the UI
    def next_samples_to_rate(self, rater_id: str, limit: int = 8,
                             model_version_id: int | None = None) -> list[dict[str, Any]]:
        """Samples this rater has not rated: newest model version first, least-rated first."""
        ids = queries.unrated_sample_ids(self.db, v.rater(rater_id), limit, model_version_id)
        return [self.get_sample(i) for i in ids]

    def next_pair(self, rater_id: str, scorer: Callable[[list[PairCandidate]], Sequence[float]] | None = None,
                  prompt: str | None = None, rng: random.Random | None = None,
                  max_candidates: int = 2000) -> PairCandidate | None:
        """The next pair to compare (two samples of one prompt this rater has not compared), or None.

        ``scorer`` maps candidates to scores (higher = ask sooner; it owns any randomness), e.g.
        ``rlr_core.feedback.active_selection.DisagreementScorer``. Without one, pairs across model versions
        come first, then prompts the rater saw least recently, at random. Sides are shuffled."""
        rng = rng or random.Random()
        cands = queries.pair_candidates(self.db, v.rater(rater_id), self.images.root, prompt)
        if not cands:
            return None
        if len(cands) > max_candidates:
            cands = rng.sample(cands, max_candidates)
        scores = list(scorer(cands)) if scorer else queries.default_pair_scores(cands, rng)
        best = cands[max(range(len(cands)), key=scores.__getitem__)]
        return best.swapped() if rng.random() < 0.5 else best

    def star_rating(self, sample_id: int, rater_id: str) -> int | None:
        return queries.star_rating(self.db, sample_id, rater_id)

    def comparison_counts(self, rater_id: str | None = None) -> dict[str, int]:
        return queries.comparison_counts(self.db, rater_id)

    def noise_settings(self, sample_ids: Sequence[int]) -> dict[int, tuple[int | None, dict[str, Any]]]:
        return queries.noise_settings(self.db, sample_ids)

    def saved_stage_prompts(self) -> dict[str, dict[int, str]]:
        return queries.saved_stage_prompts(self.db)

    def prompts_people_used(self) -> list[str]:
        return queries.prompts_people_used(self.db)

    def edited_prompts(self) -> list[str]:
        return queries.edited_prompts(self.db)

    def version_stats(self) -> list[dict[str, Any]]:
        return queries.version_stats(self.db)

    def rater_stats(self) -> list[dict[str, Any]]:
        return queries.rater_stats(self.db)

    def rater_agreement(self, min_overlap: int = 1) -> list[dict[str, Any]]:
        return queries.rater_agreement(self.db, min_overlap)

    def preference_records(self, rater_ids: Sequence[str] | None = None) -> PreferenceRecords:
        """Comparisons (skips excluded) and star ratings, with image paths, for training a proxy."""
        return queries.preference_records(self.db, self.images.root, rater_ids)

    # ----------------------------------------------------------------- integrity, export, import
    def verify(self, check_hashes: bool = True) -> list[str]:
        """Problems found (empty = healthy): SQLite integrity, foreign keys, image files."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
        problems += [f"foreign key violation in {r[0]} row {r[1]}"
                     for r in self.db.execute("PRAGMA foreign_key_check").fetchall()]
        for row in self.db["samples"].rows_where(select="id, image_path, image_sha256"):
            if check_hashes:
                issue = self.images.check(row["image_path"], row["image_sha256"])
            else:
                issue = None if self.images.path(row["image_path"]).exists() else "missing image file"
            if issue:
                problems.append(f"sample {row['id']}: {issue}")
        return problems

    def export_folder(self, out_dir: str | Path) -> Path:
        from feedback_store.export import export_folder

        return export_folder(self, Path(out_dir))

    def import_folder(self, folder: str | Path) -> dict[str, int]:
        from feedback_store.export import import_folder

        return import_folder(self, Path(folder))
