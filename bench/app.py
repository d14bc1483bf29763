"""Is the app responsive? Latency of quick actions with and without a training round running.

    python -m bench.app [--json bench/results/app.json] [--calls 60]

Starts ``python app.py`` in a subprocess on a fresh data directory (what a user runs) and
measures, through ``gradio_client``:
- launch to a served page (process start, imports, model load, server up);
- time to the first generated images (4 images, 20 steps: the Generate button's default);
- p50/p95 latency of rating (/rate), comparing (/compare) and fetching the next pair
  (/next_pair), first idle, then while a training round runs in the background worker.
Targets: p95 under 200 ms while training, and under twice the idle p95.

Each action is timed two ways. ``gradio_client``: what the issue asks for; note that the
client polls its message queue every 50 ms (gradio_client/utils.py), which sets a floor of
tens of milliseconds under any app. ``http``: the same endpoints and the same server queue
through Gradio's REST+SSE protocol with a plain HTTP client, i.e. what the app itself costs
(a browser's experience).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import print_table, write_json

ROOT = Path(__file__).resolve().parent.parent
TARGET_P95_MS = 200.0
ROUND = {"steps": 500, "batch_size": 4, "sampling_steps": 10, "seed": 0}  # outlasts the measurement


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: Path, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "RLR_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--data-dir", str(data_dir), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and b"<html" in r.read(2000).lower():
                    return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def timed(out: list[float], call, *args, api_name: str):
    """Call, append the latency in ms to ``out``, return the result."""
    t = time.perf_counter()
    result = call(*args, api_name=api_name)
    out.append((time.perf_counter() - t) * 1000)
    return result


class HttpCaller:
    """Gradio's REST API (POST /gradio_api/call/<name>, then read the SSE result): the same
    queue and handlers as gradio_client and the browser, without the client's polling."""

    def __init__(self, url: str):
        import httpx

        self.url = url.rstrip("/") + "/gradio_api/call/"
        self.http = httpx.Client(timeout=60)

    def __call__(self, *args, api_name: str):
        name = api_name.strip("/")
        event = self.http.post(self.url + name, json={"data": list(args)}).json()["event_id"]
        text = self.http.get(f"{self.url}{name}/{event}").text
        if "event: error" in text:
            raise RuntimeError(f"{name} failed: {text}")
        data = [line[6:] for line in text.splitlines() if line.startswith("data: ")][-1]
        return json.loads(data)[0]


def measure(call, samples: list[dict], calls: int, tag: str) -> dict[str, list[float]]:
    """Per action, the latency (ms) of ``calls`` calls, each a real change to the store.
    ``call(*args, api_name=...)`` is ``Client.predict`` or an ``HttpCaller``."""
    ids = [s["sample_id"] for s in samples]
    out: dict[str, list[float]] = {"rate": [], "compare": [], "next_pair": []}
    for i in range(calls):
        rater = f"bench-{tag}-{i % 7}"
        sid = ids[i % len(ids)]
        timed(out["rate"], call, sid, 1 + i % 5, rater, api_name="/rate")
        pair = timed(out["next_pair"], call, rater, api_name="/next_pair")
        left = pair["left"]["sample_id"] if pair else ids[0]
        right = pair["right"]["sample_id"] if pair else ids[1]
        outcome = ("left", "right", "tie-both-good")[i % 3]
        timed(out["compare"], call, left, right, outcome, rater, 0.5, api_name="/compare")
    return out


def summarise(transport: str, idle: dict[str, list[float]], busy: dict[str, list[float]]) -> list[dict]:
    rows = []
    for action in idle:
        i95, b95 = percentile(idle[action], 95), percentile(busy[action], 95)
        rows.append({"via": transport, "action": action, "idle_p50_ms": statistics.median(idle[action]),
                     "idle_p95_ms": i95, "training_p50_ms": statistics.median(busy[action]),
                     "training_p95_ms": b95, "ratio_p95": b95 / i95,
                     "ok": b95 < TARGET_P95_MS and b95 < 2 * i95})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--calls", type=int, default=60, help="calls per action and condition")
    args = p.parse_args(argv)
    from gradio_client import Client

    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        port = free_port()
        log = Path(tmp) / "app.log"
        proc, launch_s = start_app(Path(tmp) / "data", port, log)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            t = time.perf_counter()
            client.predict("a large red circle on the left, black background", 4, 0, 20, 3.0, api_name="/generate")
            first_images_s = time.perf_counter() - t
            samples = client.predict("a blue square", 8, 1, 4, 3.0, api_name="/generate")
            samples += client.predict("a yellow triangle", 8, 2, 4, 3.0, api_name="/generate")
            client.predict(samples[0]["sample_id"], 4, "seed-rater", api_name="/rate")  # a round needs data

            callers = {"gradio_client": client.predict, "http": HttpCaller(client.src)}
            idle, busy = {}, {}
            for via, call in callers.items():
                measure(call, samples, 5, f"warmup-{via}")
                idle[via] = measure(call, samples, args.calls, f"idle-{via}")
            client.predict(ROUND, "", api_name="/train_start")
            while not client.predict(api_name="/train_status")["history"]:  # wait for real training steps
                time.sleep(0.5)
            for via, call in callers.items():
                busy[via] = measure(call, samples, args.calls, f"busy-{via}")
            status = client.predict(api_name="/train_status")
            client.predict("", api_name="/train_stop")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    rows = [row for via in idle for row in summarise(via, idle[via], busy[via])]
    print(f"launch to a served page: {launch_s:.1f} s")
    print(f"first generated images (4 x 20 steps, first call): {first_images_s:.1f} s")
    print_table(rows, ["via", "action", "idle_p50_ms", "idle_p95_ms", "training_p50_ms", "training_p95_ms",
                       "ratio_p95", "ok"], title=f"latency through gradio_client, {args.calls} calls each")
    print(f"(training round during the measurement: {len(status['history'])} optimiser steps done)")
    result = {"launch_to_page_s": launch_s, "first_images_s": first_images_s, "calls": args.calls,
              "target_p95_ms": TARGET_P95_MS, "latency": rows, "training_steps_during": len(status["history"])}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
