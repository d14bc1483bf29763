"""Locust raters for ``bench/load.py``: people rating over Gradio's HTTP call API, from outside the app.

    locust -f bench/locustfile.py --headless -u 50 -r 25 -t 60s --host http://127.0.0.1:7860

Each ``Rater`` repeats what a person on the Rate and Compare tabs does, through the same HTTP API
a browser's scripts and a Space's visitors use (``POST /gradio_api/call/<name>``, then the event
stream of ``GET /gradio_api/call/<name>/<event_id>``): samples_to_rate -> rate -> next_pair ->
compare, pausing about ``LOAD_THINK_S`` seconds (0.5x to 1.5x) between actions. One ``QueueFloor``
user calls the no-op ``/ping`` endpoint through the same queue: what Gradio alone costs.

Locust times each action from the POST to the end of its stream under the action's name
(request type ``action``); the two HTTP requests inside are recorded too (type ``http``). Every
acknowledged rating and comparison (its id and the value sent) is written to ``LOAD_ACKS``
(a JSON file) when the run ends, so ``bench/load.py`` can check the database holds each one.
A 503 (Gradio's queue is full: the app's "busy, try again" answer) counts as ``busy``, not as
an error, and is tallied separately.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

from locust import FastHttpUser, constant, events, task

from bench.gradio_call import parse_stream

THINK_S = float(os.environ.get("LOAD_THINK_S", "1.0"))
OUTCOMES = ["left", "right", "tie-both-good", "tie-both-bad", "skip"]
ACKS: dict[str, list] = {"ratings": [], "comparisons": [], "busy": []}


class Busy(Exception):
    """Gradio answered 503: its queue is full."""


class GradioCaller(FastHttpUser):
    abstract = True

    def call(self, name: str, *data: Any) -> Any:
        """One action: join the queue, read the event stream to its end; the result or an exception."""
        start = time.perf_counter()
        error: Exception | None = None
        result = None
        try:
            with self.client.post(f"/gradio_api/call/{name}", json={"data": list(data)}, name="POST /call",
                                  catch_response=True) as joined:
                if joined.status_code == 503:
                    joined.success()  # counted under the action as busy, not as an HTTP failure
                    raise Busy(name)
                if joined.status_code != 200:
                    raise RuntimeError(f"join {joined.status_code}: {joined.text[:200]}")
                event_id = joined.json()["event_id"]
            streamed = self.client.get(f"/gradio_api/call/{name}/{event_id}", name="GET /call stream")
            result = parse_stream(streamed.text)
        except Exception as err:  # noqa: BLE001 - every failure is reported to locust
            error = err
        self.environment.events.request.fire(
            request_type="busy" if isinstance(error, Busy) else "action", name=name,
            response_time=(time.perf_counter() - start) * 1000, response_length=0,
            exception=None if isinstance(error, Busy) else error, context={})
        if isinstance(error, Busy):
            ACKS["busy"].append(name)
        return None if error is not None else result

    def pause(self) -> None:
        time.sleep(THINK_S * random.uniform(0.5, 1.5))  # gevent-patched: yields to the other users


class Rater(GradioCaller):
    wait_time = constant(0)  # the pauses are inside the loop, between its four actions

    def on_start(self) -> None:
        self.arrive()

    def arrive(self) -> None:
        """A new person (a new rater name) in this user's place."""
        self.name = f"load-{uuid.uuid4().hex[:12]}"
        self.rated: set[int] = set()

    @task
    def rate_and_compare(self) -> None:
        todo = self.call("samples_to_rate", self.name, 8)
        if todo == []:  # this person has rated the whole pool: they leave and someone new arrives
            self.arrive()
        todo = [s["sample_id"] for s in todo or [] if s["sample_id"] not in self.rated]
        if todo:
            sample_id, stars = random.choice(todo), random.randint(1, 5)
            ack = self.call("rate", sample_id, stars, self.name)
            if ack:
                self.rated.add(sample_id)
                ACKS["ratings"].append([ack["rating_id"], self.name, sample_id, stars])
        self.pause()
        pair = self.call("next_pair", self.name)
        if pair:
            left, right = pair["left"]["sample_id"], pair["right"]["sample_id"]
            outcome = random.choice(OUTCOMES)
            ack = self.call("compare", left, right, outcome, self.name, round(random.uniform(0.5, 4), 2))
            if ack:
                ACKS["comparisons"].append([ack["comparison_id"], self.name, left, right, outcome])
        self.pause()


class QueueFloor(GradioCaller):
    """The floor: a no-op through the same queue, twice a second."""

    fixed_count = 1
    wait_time = constant(0.5)

    @task
    def ping(self) -> None:
        self.call("ping")


@events.quitting.add_listener
def write_acks(environment, **_kwargs) -> None:
    path = os.environ.get("LOAD_ACKS")
    if path:
        with open(path, "w") as f:
            json.dump(ACKS, f)
