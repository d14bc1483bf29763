"""Model versions as the app serves them: the base model plus each version's LoRA weights.

Generation asks for a version's backend; a few are kept loaded (the active one, its parent
for before/after pairs). Training never touches these: it gets its own deep copy, because the
estimators change weights in place (ZO perturbations, optimiser steps) while people keep
generating with the served ones. Sampling needs no lock (it never mutates a backend: the
sampler computes its step tables on private scheduler copies); ``lock`` guards the cache.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path

from app.errors import AppError
from feedback_store import FeedbackStore
from rlr_core.backends.base import DiffusionBackend
from rlr_core.training import lora

VERSIONS_DIR = "versions"  # under the data folder; app.rounds writes each round's folder there


class ModelRegistry:
    def __init__(self, base: DiffusionBackend, store: FeedbackStore, cache_size: int = 3):
        self.base = base
        self.store = store
        self.cache_size = cache_size
        self.lock = threading.RLock()
        self._cache: OrderedDict[int, DiffusionBackend] = OrderedDict()

    def weights_path(self, version_id: int) -> Path | None:
        """The version's folder: stored relative to the data folder (older rows: absolute), and
        only ever inside the data folder's ``versions/`` (an imported row cannot point elsewhere)."""
        stored = self.store.get_model_version(version_id)["weights_path"]
        if not stored:
            return None
        root = (self.store.data_dir / VERSIONS_DIR).resolve()
        path = (self.store.data_dir / stored).resolve()  # an absolute stored path replaces data_dir
        if root not in path.parents:
            raise AppError(f"version {version_id} points at weights outside this app's data folder; "
                           "it cannot be loaded")
        return path

    def relative_weights_path(self, stored: str | None) -> str | None:
        """A weights path as public responses show it: relative to the data folder."""
        if not stored:
            return None
        path = Path(stored)
        if not path.is_absolute():
            return stored
        try:
            return str(path.resolve().relative_to(self.store.data_dir.resolve()))
        except ValueError:
            return "(outside the data folder)"

    def _load(self, version_id: int) -> DiffusionBackend:
        path = self.weights_path(version_id)
        if path is None:
            return self.base
        if not path.exists():
            raise AppError(f"the weights of version {version_id} are missing on disk")
        backend = copy.deepcopy(self.base)
        lora.apply_version(backend, path)
        return backend

    def backend(self, version_id: int) -> DiffusionBackend:
        """The backend that draws ``version_id`` (loaded once, then cached)."""
        with self.lock:
            if version_id in self._cache:
                self._cache.move_to_end(version_id)
                return self._cache[version_id]
            backend = self._load(version_id)
            self._cache[version_id] = backend
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return backend

    def training_copy(self, version_id: int) -> DiffusionBackend:
        """A private copy of ``version_id`` for a training round to change as it likes."""
        with self.lock:
            served = self.backend(version_id)
            return copy.deepcopy(served)
