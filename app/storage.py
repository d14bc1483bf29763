"""Where a hosted app keeps its data, and the warning it shows when nothing will survive a restart.

A Space's own disk is wiped at every restart (its old persistent storage was discontinued). Data
survives in a Storage Bucket mounted on the Space, named by ``RLR_DATA_DIR``; without one the UI
says so on every page, and admins can push exports to a Hub dataset repo (:mod:`app.hub_export`).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path

NO_BUCKET = ("⚠️ **This Space keeps its data on its own disk, which is wiped when the Space restarts**: "
             "ratings, comparisons and trained versions will be lost. Admins: mount a Storage Bucket "
             "and set `RLR_DATA_DIR` to it, or push an export to a Hub dataset (Data tab).")


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def storage_warning(data_dir: Path) -> str | None:
    """The banner for this app, or None when the data will survive a restart (or it is not a Space)."""
    if not on_space():
        return None
    if not os.environ.get("RLR_DATA_DIR"):
        return NO_BUCKET
    problem = sqlite_problem(data_dir)
    if problem:
        return (f"⚠️ **The data folder `RLR_DATA_DIR` cannot hold the ratings database**: {problem}. "
                "Ratings may be lost; check the bucket's mount.")
    return None


def sqlite_problem(folder: Path) -> str | None:
    """None if SQLite in WAL mode (what the store uses) can write, read and lock in ``folder``.

    Network and FUSE mounts can lack the shared memory and locks WAL needs; this finds out at
    start-up instead of at the first lost rating."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".sqlite-check-") as tmp:
            db = sqlite3.connect(Path(tmp) / "check.db", timeout=2)
            try:
                mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                db.execute("CREATE TABLE t (x INTEGER)")
                db.execute("INSERT INTO t VALUES (1)")
                db.commit()
                other = sqlite3.connect(Path(tmp) / "check.db", timeout=2)
                try:
                    n = other.execute("SELECT count(*) FROM t").fetchone()[0]
                finally:
                    other.close()
            finally:
                db.close()
        if mode.lower() != "wal":
            return f"SQLite could not switch to WAL mode there (got {mode!r})"
        if n != 1:
            return "a second connection did not see a committed row"
    except (OSError, sqlite3.Error) as err:
        return f"{type(err).__name__}: {err}"
    return None
