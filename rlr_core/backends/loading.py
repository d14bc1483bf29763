"""Pick and load the backend for a ``--model`` value."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlr_core.backends.base import DiffusionBackend


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says why and what to do, in one line."""


def is_builtin_folder(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("kind") == "shapesworld-builtin"
    except (OSError, ValueError):
        return False


def load_backend(model: str | Path, device: str | torch.device = "cpu") -> DiffusionBackend:
    """The backend for ``model``: a built-in ShapesWorld model folder."""
    path = Path(model)
    if is_builtin_folder(path):
        from rlr_core.backends.builtin import BuiltinBackend

        return BuiltinBackend.load(path, device=device)
    if not path.exists():
        raise ModelLoadError(f"--model {model}: no such folder")
    raise ModelLoadError(f"--model {model}: not a built-in model folder (no model_index.json of kind "
                         "'shapesworld-builtin')")
