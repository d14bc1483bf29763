"""Gradio's queue as this app sets it up: how many requests may wait, and what the queue does per event.

Every event goes through Gradio's queue (``demo.queue``). Two settings are chosen on purpose,
measured under 50 raters (docs/benchmarks.md, "Load"; docs/deploy.md, "Queue limits"):

- ``max_size``: requests that may wait; past it a new one is answered HTTP 503 ("busy, try again")
  at once instead of waiting (``--queue-size``).
- Gradio's own per-event analytics (``GRADIO_ANALYTICS_*``): after every event the queue rebuilds a
  pandas table of its last 10,000 events to refresh the summary behind its monitoring page. Under
  a crowd that was a fifth of the server's time holding the GIL, and it grew with the run; here
  the summary is refreshed every 1,000 events over the last 1,000. An operator's own environment
  values win.
"""

from __future__ import annotations

import os

import gradio as gr

ANALYTICS_ENV = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "1000", "GRADIO_ANALYTICS_MAX_EVENTS": "1000"}


def configure_queue(demo: gr.Blocks, queue_size: int) -> None:
    """The app's queue on ``demo``: ``queue_size`` may wait; analytics refreshed every 1,000 events."""
    for name, value in ANALYTICS_ENV.items():
        os.environ.setdefault(name, value)  # read by gradio.queueing.Queue when the queue is built
    # Per-event limits come from the concurrency groups (app/tabs/common.py): ratings run 16 at a
    # time, model work one at a time.
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
