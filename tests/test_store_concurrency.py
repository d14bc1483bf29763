"""Concurrent writers lose nothing; a writer killed mid-write leaves a consistent store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from feedback_store import FeedbackStore

REPO = Path(__file__).resolve().parent.parent


def _samples(store: FeedbackStore, n: int) -> list[int]:
    rng = np.random.default_rng(0)
    return [store.add_sample(rng.random((32, 32, 3)), "a red circle", seed=i) for i in range(n)]


def test_eight_threads_write_at_once_and_lose_nothing(tmp_path):
    store = FeedbackStore(tmp_path)
    ids = _samples(store, 150)
    errors: list[BaseException] = []
    written: list[list[int]] = [[] for _ in range(8)]
    stop = time.monotonic() + 2.0
    barrier = threading.Barrier(8)

    def writer(w: int) -> None:
        try:
            barrier.wait()
            for i, sid in enumerate(ids):
                if time.monotonic() > stop and i >= 10:
                    break
                written[w].append(store.add_rating(sid, f"rater-{w}", 1 + (i + w) % 5))
                if i % 3 == 0:  # comparisons and new samples go through the same lock
                    store.add_comparison(sid, ids[(i + 1) % len(ids)], "left", f"rater-{w}", 0.5)
                if i % 10 == 0:
                    store.add_sample(np.full((32, 32, 3), (w * 60 + i) % 256, np.uint8), "a blue square")
        except BaseException as err:  # noqa: BLE001 - any error fails the test below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = {(r["rater_id"], r["sample_id"]): r["stars"] for r in store.db["ratings"].rows}
    assert len(rows) == sum(map(len, written))
    for w, mine in enumerate(written):
        for i in range(len(mine)):
            assert rows[(f"rater-{w}", ids[i])] == 1 + (i + w) % 5
    assert store.verify() == []
    store.close()


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from feedback_store import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    ids = [int(x) for x in sys.argv[3].split(",")]
    rater = sys.argv[2]
    for i, sid in enumerate(ids):
        rid = store.add_rating(sid, rater, 1 + i % 5)
        if i % 4 == 0:  # image files too: each must be complete before its row exists
            store.add_sample(np.random.default_rng(i).random((64, 64, 3)), "a green circle", seed=i)
        print(rid, sid, 1 + i % 5, flush=True)   # printed only after the commit returned
""")


def _spawn(data: Path, rater: str, ids: list[int]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(data), rater, ",".join(map(str, ids))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def test_processes_write_at_once(tmp_path):
    with FeedbackStore(tmp_path) as store:
        ids = _samples(store, 40)
    procs = [_spawn(tmp_path, f"proc-{k}", ids) for k in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err
    with FeedbackStore(tmp_path) as store:
        assert store.counts()["ratings"] == 4 * 40
        assert store.verify() == []


@pytest.mark.parametrize("round_", range(2))
def test_sigkill_mid_write_keeps_every_committed_rating(tmp_path, round_):
    with FeedbackStore(tmp_path) as store:
        ids = _samples(store, 400)
    proc = _spawn(tmp_path, "victim", ids)
    committed = []
    want = 20 + 17 * round_  # kill at a different point each round
    while len(committed) < want:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        committed.append(tuple(map(int, line.split())))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # Whatever the writer was doing when it died, the store opens, is consistent, has every
    # rating whose commit returned, and every sample row's image file exists and is whole.
    with FeedbackStore(tmp_path) as store:
        assert store.verify() == []
        rows = {r["id"]: (r["sample_id"], r["stars"]) for r in store.db["ratings"].rows}
        for rid, sid, stars in committed:
            assert rows[rid] == (sid, stars)
        assert len(rows) >= len(committed)
