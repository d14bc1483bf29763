"""SQLite connections and write transactions for the store.

Why each setting:
- WAL: readers never block the writer and the writer never blocks readers.
- ``busy_timeout``: a writer waits for the lock instead of failing at once.
- ``BEGIN IMMEDIATE``: take the write lock at the start of the transaction. A deferred
  transaction that reads and then writes can fail with SQLITE_BUSY *without* waiting when
  another writer committed in between; immediate ones just queue on the busy timeout.
- ``synchronous=NORMAL`` (default): in WAL mode a committed transaction survives any crash of
  the process (SIGKILL included) and the file is never corrupted; only a power cut or OS crash
  can lose the last commits before a checkpoint. ``FULL`` also survives those, at one fsync
  per commit: measured here, fsync takes 2 ms at the median but ~50 ms at p99, which alone
  breaks a 20 ms p99 write budget. Pass ``synchronous="FULL"`` to FeedbackStore to choose it.
- Retry on SQLITE_BUSY: if the busy timeout still runs out, the whole transaction is rerun.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlite_utils import Database

from feedback_store.errors import FULL_MESSAGE, StoreBusyError, StoreFullError

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
MAX_ATTEMPTS = 8


def connect(path: Path, synchronous: str = "NORMAL") -> Database:
    if synchronous not in ("NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
    # check_same_thread=False only so that FeedbackStore.close() can close every thread's
    # connection; each connection is still used by one thread at a time.
    # RLR_BUSY_TIMEOUT_MS: how long one attempt waits for another process's lock (tests shorten it).
    busy_ms = int(os.environ.get("RLR_BUSY_TIMEOUT_MS", BUSY_TIMEOUT_MS))
    conn = sqlite3.connect(str(path), timeout=busy_ms / 1000, check_same_thread=False)
    db = Database(conn, execute_plugins=False)
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return db


def enable_wal(db: Database) -> None:
    for attempt in range(MAX_ATTEMPTS):
        try:
            db.enable_wal()
            return
        except sqlite3.OperationalError as err:
            if not is_busy(err) or attempt == MAX_ATTEMPTS - 1:
                raise
            _backoff(attempt)


def is_busy(err: BaseException) -> bool:
    return isinstance(err, sqlite3.OperationalError) and (
        "locked" in str(err) or "busy" in str(err).lower()
    )


def _backoff(attempt: int) -> None:
    time.sleep(min(0.5, 0.005 * 2**attempt) * (0.5 + random.random()))


def write(db: Database, fn: Callable[[Database], T]) -> T:
    """Run ``fn(db)`` in one ``BEGIN IMMEDIATE`` transaction: commit if it returns, roll back
    if it raises. Rerun it (with backoff) when SQLite reports the database busy."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.conn.execute("COMMIT")
                return result
            except BaseException:
                db.rollback()
                raise
        except sqlite3.OperationalError as err:
            if "disk is full" in str(err):
                raise StoreFullError(FULL_MESSAGE) from err
            if not is_busy(err):
                raise
            if attempt == MAX_ATTEMPTS - 1:
                raise StoreBusyError(
                    "the feedback database is busy (other writers held it too long); "
                    "your answer was not saved, please try again"
                ) from err
            _backoff(attempt)
    raise AssertionError("unreachable")
