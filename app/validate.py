"""Checks on values that come from the browser or the API, each with a message for the user.

Browsers send numbers as floats (a seed of 3 arrives as 3.0) and API clients send whatever
they like, so every number is checked for type, wholeness and range before it is used.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from app.errors import AppError

RATER_RE = re.compile(r"^[\w .@+-]{1,64}$")


def _number(value: Any, message: str) -> float:
    """``value`` as a finite float, or AppError(message) for anything else (bools included)."""
    if isinstance(value, bool) or value is None or value == "":
        raise AppError(message)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AppError(message) from None
    if not math.isfinite(number):
        raise AppError(message)
    return number


def whole(value: Any, name: str, lo: int, hi: int) -> int:
    message = f"{name} must be a whole number from {lo} to {hi}, got {value!r}"
    number = _number(value, message)
    if number != int(number) or not lo <= number <= hi:
        raise AppError(message)
    return int(number)


def real(value: Any, name: str, lo: float, hi: float) -> float:
    message = f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}"
    number = _number(value, message)
    if not lo <= number <= hi:
        raise AppError(message)
    return number


def flag(value: Any, name: str) -> bool:
    """A yes/no setting: a JSON boolean (or 0 / 1, as forms and scripts send it)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, (int, float)) or value not in (0, 1):
        raise AppError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def sample_id(value: Any, name: str = "sample id") -> int:
    return whole(value, name, 1, 2**62)


def choice(value: Any, name: str, options: tuple[str, ...] | list[str]) -> str:
    if value not in options:
        raise AppError(f"{name} must be one of {', '.join(options)}; got {value!r}")
    return value


def rater(value: Any) -> str:
    """A rater id: the name a person typed (letters, digits, spaces, . @ + - _)."""
    if not isinstance(value, str) or not value.strip():
        raise AppError("enter your name (top of the page) before rating, so ratings can be told apart")
    name = value.strip()
    if not RATER_RE.match(name):
        raise AppError("a rater name may hold up to 64 letters, digits, spaces and . @ + - _")
    return name


ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def no_controls(value: Any, name: str) -> Any:
    """Refuse text with control characters (NUL and the like); tabs and line breaks are kept."""
    if isinstance(value, str):
        bad = next((c for c in value if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROLS), None)
        if bad is not None:
            raise AppError(f"the {name} contains a control character ({ord(bad):#04x}); remove it and try again")
    return value
