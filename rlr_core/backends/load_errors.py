"""How a failed model load is told: one ``ModelLoadError`` line naming the model and what to do."""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says why and what to do, in one line."""


def model_name(label: str, path: Path) -> str:
    """A readable name: the hub id, else the folder's name."""
    if HUB_ID.match(label) and not Path(label).exists():
        return label
    return path.resolve().name


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
