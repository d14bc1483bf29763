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

One repair: Gradio keeps each session's outgoing messages in a 2,000-entry LRU
(``Queue.pending_messages_per_session``) and evicts the oldest session when a new one arrives,
whether or not that session still has an event waiting or running. Every call over the HTTP call
API is a session of its own, so under 50 raters the LRU turns over in about 25 s: a slow event's
session (a generation, a browser page's click behind a long queue) was evicted before its result,
and sending that result raised ``KeyError`` inside the queue's processing task, which ended it;
from then on no event was processed (seen in ``bench/load.py``). :class:`PendingAwareSessions`
evicts the oldest session with no event waiting or running instead.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from typing import Any

import gradio as gr
from gradio.utils import LRUCache

ANALYTICS_ENV = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "1000", "GRADIO_ANALYTICS_MAX_EVENTS": "1000"}


def configure_queue(demo: gr.Blocks, queue_size: int) -> None:
    """The app's queue on ``demo``: ``queue_size`` may wait; analytics refreshed every 1,000 events."""
    for name, value in ANALYTICS_ENV.items():
        os.environ.setdefault(name, value)  # read by gradio.queueing.Queue when the queue is built
    # Per-event limits come from the concurrency groups (app/tabs/common.py): ratings run 16 at a
    # time, model work one at a time.
    demo.queue(default_concurrency_limit=1, max_size=queue_size)
    install_pending_aware_sessions(demo._queue)


class PendingAwareSessions(LRUCache):
    """Gradio's session -> message-queue LRU, evicting only sessions with no event waiting or running.

    ``pending`` is the queue's ``pending_event_ids_session`` (session -> ids of its events whose
    result has not been streamed yet) and ``live`` its ``event_ids_to_events`` (events waiting or
    running). A session whose events are all done but never read (a client that left) may still
    go, as in Gradio's own LRU, so the cache stays bounded; when every session has a live event
    the cache grows past ``max_size``, and the queue's ``max_size`` bounds how many can be live."""

    def __init__(self, max_size: int, pending: dict[str, set[str]], live: dict[str, Any]):
        super().__init__(max_size)
        self.pending, self.live = pending, live

    def busy(self, session: str) -> bool:
        return any(event_id in self.live for event_id in self.pending.get(session, ()))

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            self.move_to_end(key)
        elif len(self) >= self.max_size:
            idle = next((k for k in self if not self.busy(k)), None)  # oldest first
            if idle is not None:
                del self[idle]
        OrderedDict.__setitem__(self, key, value)


def install_pending_aware_sessions(queue: Any) -> bool:
    """Swap the queue's session LRU for :class:`PendingAwareSessions`, keeping what it holds; False
    (a warning, and Gradio's own LRU) where the queue is not the shape this was written against."""
    sessions = getattr(queue, "pending_messages_per_session", None)
    pending = getattr(queue, "pending_event_ids_session", None)
    live = getattr(queue, "event_ids_to_events", None)
    if isinstance(sessions, PendingAwareSessions):
        return True
    if type(sessions) is not LRUCache or not isinstance(pending, dict) or not isinstance(live, dict):
        warnings.warn("gradio's queue is not the shape app/queue_settings.py knows: its session cache may drop "
                      "a session whose event still waits (see tests/test_queue_sessions.py)", stacklevel=2)
        return False
    replacement = PendingAwareSessions(sessions.max_size, pending, live)
    for key, value in sessions.items():
        OrderedDict.__setitem__(replacement, key, value)
    queue.pending_messages_per_session = replacement
    return True
