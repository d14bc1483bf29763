"""Model versions: which one is active, the table of them with their human judgements, switching,
rollback and LoRA export.

Reading the active version never writes: :meth:`Versions.active` is ``None`` while a fresh
store has no version. The base version's row is made explicitly, by :meth:`Versions.ensure_base`,
which the actions that draw or train with a version call; a fresh data folder stays empty until
then, so it can still take an import (the store imports only into an empty one).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import files
from app import validate as check
from app.errors import AppError
from app.models import ModelRegistry
from app.safeguards import fidelity_flags, judge
from app.state import StateFile
from feedback_store import FeedbackStore

BASE_VERSION_NAME = "v0 (base)"


class Versions:
    def __init__(self, store: FeedbackStore, state: StateFile, models: ModelRegistry, downloads: files.TempFiles,
                 authorise: Callable[[Any], None], base_config: dict[str, Any]):
        self.store = store
        self.state = state
        self.models = models
        self.downloads = downloads
        self.authorise = authorise  # raises unless the caller may change the model
        self.base_config = base_config  # the base version row's config, when it is made
        self._lock = threading.Lock()

    def active(self) -> int | None:
        """The active version's id; None while there is no version yet. Only reads.

        With no (or a stale) state file: the newest version a finished round made, else a base."""
        versions = self.store.model_versions()
        active = self.state.get().active_version_id
        if active in {v["id"] for v in versions}:
            return active
        if not versions:
            return None
        finished = {r["output_version_id"] for r in self.store.training_rounds("finished")}
        good = [v["id"] for v in versions if v["id"] in finished] or [
            v["id"] for v in versions if v["parent_id"] is None]
        return max(good)

    def settle(self) -> int | None:
        """Store :meth:`active`'s choice in the state file when it had none (or a stale one); makes no row."""
        vid = self.active()
        if vid is not None and vid != self.state.get().active_version_id:
            self.state.update(active_version_id=vid)
        return vid

    def ensure_base(self) -> int:
        """The active version's id, making the base version's row first in a store without versions."""
        with self._lock:
            vid = self.settle()
            if vid is None:
                vid = self.store.add_model_version(BASE_VERSION_NAME, config=dict(self.base_config))
                self.state.update(active_version_id=vid)
            return vid

    def name(self, version_id: int | None) -> str:
        if version_id is None:
            return "?"
        return self.store.get_model_version(version_id)["name"]

    def table(self) -> list[dict[str, Any]]:
        """Every version with its human judgements (stars, win rate over its parent)."""
        active = self.active()
        meta = {v["id"]: v for v in self.store.model_versions()}
        stats = self.store.version_stats()
        # flagged / best-judged from the blind pairs and the fidelity guard (app/safeguards.py)
        judged = judge(stats, fidelity_flags(meta.values()))
        out = []
        for row in stats:
            v = meta[row["version_id"]]
            out.append({**row, **judged[row["version_id"]], "active": row["version_id"] == active,
                        "created_at": v["created_at"], "estimator": v["config"].get("estimator"),
                        "seed": v["config"].get("seed"), "round_id": v["config"].get("round_id"),
                        "weights_path": self.models.relative_weights_path(v["weights_path"]),
                        "metrics": v["metrics"]})
        return out

    def set_active(self, version_id: Any, password: Any = None) -> dict[str, Any]:
        self.authorise(password)
        vid = check.whole(version_id, "version id", 1, 2**62)
        version = self.store.get_model_version(vid)
        self.models.backend(vid)  # load it now: a broken version fails here, not at the next generation
        self.state.update(active_version_id=vid)
        return version

    def rollback(self, password: Any = None, version_id: Any = None) -> dict[str, Any]:
        """Make the active version's parent active again, or the chosen version (e.g. the best-judged one)."""
        self.authorise(password)
        if version_id not in (None, ""):
            return self.set_active(version_id, password)
        current = self.store.get_model_version(self.ensure_base())
        if current["parent_id"] is None:
            raise AppError(f"{current['name']} is the base model; there is nothing to roll back to")
        return self.set_active(current["parent_id"], password)

    def export_lora(self, version_id: Any) -> Path:
        """The version's folder (LoRA safetensors + adapter config + round settings) as a .zip."""
        vid = check.whole(version_id, "version id", 1, 2**62)
        version = self.store.get_model_version(vid)
        path = self.models.weights_path(vid)
        if path is None:
            raise AppError("the base model has no LoRA weights; pick a version a training round made")
        if not path.is_dir():
            raise AppError(f"the weights of version {vid} are missing on disk")
        out = self.downloads.new_folder()
        stem = "".join(c if c.isalnum() else "-" for c in version["name"]).strip("-")
        return Path(shutil.make_archive(str(out / f"{stem}-lora"), "zip", root_dir=path))
