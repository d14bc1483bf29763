"""Gradio's session LRU never drops a session whose event is still waiting or running
(app/queue_settings.py): under a crowd of API calls, each a session of its own, a slow event's
result still reaches its caller and the queue keeps serving."""

from __future__ import annotations

import httpx
import pytest

from app.queue_settings import PendingAwareSessions
from bench.gradio_call import call, parse_stream

PREVIEW = ["a red circle", 4, 0, 30, 3.0, None, True]  # a few seconds of model work; stores nothing


def test_the_oldest_idle_session_is_evicted_and_live_ones_are_kept():
    live = {"event-1": "running"}  # the queue's events waiting or running
    pending = {"a": {"event-1"}, "b": set(), "c": {"event-0"}}  # event-0 done, its result never read
    sessions = PendingAwareSessions(3, pending, live)
    for key in "abc":
        sessions[key] = key
    sessions["d"] = "d"  # full: "a" is oldest but its event is running, so "b" goes
    assert list(sessions) == ["a", "c", "d"]
    sessions["e"] = "e"  # "c"'s event is done: a client that left does not pin its session
    assert list(sessions) == ["a", "d", "e"]
    live.update({"event-2": "waiting", "event-3": "waiting"})
    pending.update(d={"event-2"}, e={"event-3"})
    sessions["f"] = "f"  # every session live: the cache grows rather than drop one
    assert list(sessions) == ["a", "d", "e", "f"]
    del live["event-1"]
    sessions["g"] = "g"
    assert list(sessions) == ["d", "e", "f", "g"]


@pytest.fixture(scope="module")
def small_lru(tmp_path_factory, builtin_backend):
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("sessions"), port=0), builtin_backend)
    app.url = app.url.rstrip("/")
    app.demo._queue.pending_messages_per_session.max_size = 4  # Gradio's is 2,000: the same turnover, sooner
    yield app
    app.close()


def test_slow_events_outlive_a_crowd_of_short_sessions(small_lru):
    assert isinstance(small_lru.demo._queue.pending_messages_per_session, PendingAwareSessions)
    client = httpx.Client(base_url=small_lru.url, timeout=300)
    # two generations in the one-at-a-time model group: one runs, one waits
    events = [client.post("/gradio_api/call/generate", json={"data": PREVIEW}).json()["event_id"] for _ in range(2)]
    for _ in range(12):  # each call is a new session: with Gradio's LRU both generations' sessions go
        assert call(client, "ping")["ok"] is True
    for event_id in events:
        images = parse_stream(client.get(f"/gradio_api/call/generate/{event_id}").text)
        assert len(images) == 4
    assert call(client, "ping")["ok"] is True  # the queue still processes events
    # and the cache stays bounded: finished calls' sessions are dropped again
    assert len(small_lru.demo._queue.pending_messages_per_session) <= 4
