"""Round folders (``data/versions/round-<id>``) that no model version uses are removed.

A round writes its adapter folder before the version row that points at it; a round that is
stopped or fails after that point leaves a folder nothing refers to. ``discard`` removes such a
folder when its round ends without a version, and ``discard_orphans`` sweeps the ones a
killed process left behind (at start-up, when no round runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from app.models import VERSIONS_DIR
from feedback_store import FeedbackStore


def round_folder(data_dir: Path, round_id: int) -> Path:
    return Path(data_dir) / VERSIONS_DIR / f"round-{round_id}"


def _used(store: FeedbackStore) -> set[Path]:
    used = set()
    for v in store.model_versions():
        if v["weights_path"]:
            used.add((store.data_dir / v["weights_path"]).resolve())
    return used


def discard(store: FeedbackStore, round_id: int) -> bool:
    """Remove round ``round_id``'s folder unless a model version uses it; True if removed."""
    folder = round_folder(store.data_dir, round_id)
    if not folder.exists() or folder.resolve() in _used(store):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def discard_orphans(store: FeedbackStore) -> int:
    """Remove every round folder no model version uses (call only while no round runs)."""
    root = Path(store.data_dir) / VERSIONS_DIR
    if not root.is_dir():
        return 0
    used = _used(store)
    removed = 0
    for folder in root.glob("round-*"):
        if folder.is_dir() and folder.resolve() not in used:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed
