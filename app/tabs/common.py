"""What the tabs share: concurrency groups, the session's components, small formatters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

# Quick actions (rate, compare, status polls) never queue behind slow ones (generation,
# previews): separate concurrency groups, and only the slow group is limited to one at a time.
QUICK_API = {"concurrency_id": "quick", "concurrency_limit": 16}
MODEL_API = {"concurrency_id": "model", "concurrency_limit": 1}
# In the UI, quick events show no spinner, and so a gr.Error from them only raises a message
# instead of covering their output components with an error badge.
QUICK = {**QUICK_API, "show_progress": "hidden"}
MODEL = MODEL_API
PRIVATE = {"api_visibility": "private"}  # the UI's events; the public API lives in app/api.py


@dataclass
class Session:
    """Components every tab reads: who is rating, and the admin password (public apps only)."""

    rater: gr.Textbox | gr.State  # a State on a public app: set by the server, never typed
    password: gr.Textbox


def stars_text(stars: int | None) -> str:
    return "not rated" if not stars else "★" * stars + "☆" * (5 - stars)


def short_version(name: str) -> str:
    """'v3 (rlr)' -> 'v3': gallery captions have room for a few characters only."""
    return name.split(" ")[0]


def sample_caption(sample: dict[str, Any], stars: int | None = None) -> str:
    text = f"{short_version(sample['version'])} · #{sample['sample_id']}"
    return text + (f" · {stars}★" if stars else "")


def fmt(value: Any, digits: int = 3) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    return value
