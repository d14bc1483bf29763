"""Gradio's HTTP call API, as a browser's scripts and a Space's visitors reach the app.

``POST /gradio_api/call/<name>`` with ``{"data": [...]}`` answers ``{"event_id": ...}``; then
``GET /gradio_api/call/<name>/<event_id>`` streams ``event: ...`` / ``data: ...`` lines that end
with ``event: complete`` (the result) or ``event: error``. No gevent or locust here: the load
benchmark's own process uses it with httpx, the locust raters with their own client.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class CallError(RuntimeError):
    """The app answered with an error event (e.g. a refused value)."""


def parse_stream(text: str) -> Any:
    """The result of a call stream; an error event raises ``CallError``."""
    event, data = None, None
    for line in text.splitlines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
    if event != "complete" or data is None:
        raise CallError(f"{event}: {(data or '')[:300]}")
    values = json.loads(data)
    return values[0] if isinstance(values, list) and len(values) == 1 else values


def call(client: httpx.Client, name: str, *data: Any) -> Any:
    """One endpoint call through the queue, waiting for its result."""
    joined = client.post(f"/gradio_api/call/{name}", json={"data": list(data)})
    joined.raise_for_status()
    streamed = client.get(f"/gradio_api/call/{name}/{joined.json()['event_id']}")
    streamed.raise_for_status()
    return parse_stream(streamed.text)
