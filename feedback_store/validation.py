"""Checks on values from the UI, each failing with a ``ValidationError`` a person can read."""

from __future__ import annotations

import json
import math
import numbers
from datetime import UTC, datetime
from typing import Any

from feedback_store.errors import ValidationError
from feedback_store.schema import OUTCOMES

MAX_TEXT = 2000


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def text(value: Any, what: str, max_len: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{what} must be non-empty text, got {value!r}")
    if len(value) > max_len:
        raise ValidationError(f"{what} is {len(value)} characters long; the limit is {max_len}")
    return value


def optional_text(value: Any, what: str, max_len: int = MAX_TEXT) -> str | None:
    return None if value is None else text(value, what, max_len)


def identifier(value: Any, what: str) -> int:
    if not _is_int(value):
        raise ValidationError(f"{what} must be an integer id, got {value!r}")
    return int(value)


def rater(value: Any) -> str:
    return text(value, "rater id", 200)


def stars(value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= 5:
        raise ValidationError(f"a rating must be a whole number of stars from 1 to 5, got {value!r}")
    return int(value)


def outcome(value: Any) -> str:
    if value not in OUTCOMES:
        raise ValidationError(f"comparison outcome must be one of {', '.join(OUTCOMES)}; got {value!r}")
    return value


def response_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValidationError(f"response time must be a non-negative number of seconds, got {value!r}")
    return float(value)


def progress(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValidationError(f"training progress must be a number from 0 to 1, got {value!r}")
    return float(value)


def json_object(value: Any, what: str) -> str:
    """Serialise a dict to JSON text (strict: no NaN, only JSON types)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValidationError(f"{what} must hold only JSON values (no NaN): {err}") from err


def stage_prompts(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise ValidationError("stage prompts must be a list of strings, one per DCoT stage")
    return json.dumps(list(value))


def seed(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not -(2**63) <= value < 2**63:
        raise ValidationError(f"seed must be a 64-bit integer, got {value!r}")
    return int(value)
