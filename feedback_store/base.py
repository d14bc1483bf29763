"""The store's connection handling: per-thread SQLite connections, one fair write lock per
database file, and the row helpers every part of :class:`feedback_store.FeedbackStore` shares.

Thread- and process-safe: every thread gets its own SQLite connection, every write is one
short ``BEGIN IMMEDIATE`` transaction (retried on SQLITE_BUSY), and any number of processes
may open the same data directory.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from sqlite_utils import Database

from feedback_store import db as dbmod
from feedback_store import validation as v
from feedback_store.errors import NotFoundError
from feedback_store.images import ImageFiles
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


class StoreBase:
    """Connections, the write path and lookups by id; the store's parts build on these."""

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

    def __enter__(self) -> Self:
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

    # ----------------------------------------------------------------- shared row helpers
    def _require(self, db: Database, table: str, row_id: Any, what: str) -> dict[str, Any]:
        rows = list(db[table].rows_where("id = ?", [row_id], limit=1))
        if not rows:
            raise NotFoundError(f"there is no {what} with id {row_id!r}")
        return rows[0]

    @staticmethod
    def _ensure_rater(db: Database, rater_id: str, kind: str = "person", name: str | None = None) -> None:
        db.conn.execute("INSERT OR IGNORE INTO raters (id, kind, name, created_at) VALUES (?, ?, ?, ?)",
                        [rater_id, kind, name, v.now()])

    @staticmethod
    def _prompt_id(db: Database, text: str) -> int:
        rows = list(db["prompts"].rows_where("text = ?", [text], select="id", limit=1))
        if rows:
            return rows[0]["id"]
        return db["prompts"].insert({"text": text, "created_at": v.now()}).last_pk
