"""A round's training steps in a process of their own, so that serving requests never waits on them.

Why: in one Python process the training steps and the request handlers take turns holding the
GIL, so on a small CPU machine a round slowed every click (p95 of a rating 3-4 s under 50 raters)
and the raters starved the round in turn (8 of 20 steps in 5 minutes). In its own process the
round gets a core of its own and the server keeps its GIL (docs/benchmarks.md, "Load").

The round runs as chunks (:func:`rlr_core.training.chunked.run_chunked_round`): the process gets
the model and the reward once per round, then each chunk the round's state (adapter weights,
optimiser, random generators) and returns the next state, so the caller sees every step's
progress, can stop between chunks and checks the weights where it wants to. The process is
started once (``spawn``: no fork of a threaded server) and kept for later rounds; it runs at a
lower priority than the server.

    rounds = RoundProcess(threads=1)
    result = run_chunked_round(backend, reward, config, out, call=rounds.chunk_call(), ...)
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import torch

from rlr_core.estimators.backend_chain import RewardFn
from rlr_core.training.chunked import ChunkCall, ChunkOutcome, run_chunk
from rlr_core.training.resume import RoundState
from rlr_core.training.round import TrainConfig

T = TypeVar("T")
NICE = 10  # the server's threads come first
PARENT_CHECK_S = 1.0

# In the round process: the current round's model and reward, sent once per round.
_CURRENT: dict[str, Any] = {}


def _start_round_process(threads: int, parent: int) -> None:
    torch.set_num_threads(threads)
    try:
        os.nice(NICE)
    except OSError:
        pass  # not allowed here: the process keeps the normal priority
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this process once the app that started it is gone (even killed with -9): the worker
    waits on a queue whose write end it also holds, so it would never see the app go."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _chunk_in_round_process(round_id: int, model: tuple | None, config: TrainConfig, out: str,
                            state: RoundState | None, budget_s: float, pause_at: int | None,
                            hold: bool) -> ChunkOutcome:
    """One chunk, run in the round process; ``model`` (backend, reward) comes with a round's first chunk."""
    if model is not None:
        _CURRENT.clear()
        _CURRENT.update(round_id=round_id, backend=model[0], reward=model[1])
    if _CURRENT.get("round_id") != round_id:
        raise RuntimeError("the round process lost this round's model (it was restarted): start the round again")
    backend, reward = _CURRENT["backend"], _CURRENT["reward"]
    return run_chunk(backend, reward, config, out, state, budget_s, None, getattr(reward, "observe", None),
                     pause_at=pause_at, hold=hold)


def _call(payload: bytes) -> bytes:
    """``fn(*args, **kwargs)`` from plain-pickled bytes, its result pickled the same way.

    Why bytes: multiprocessing's own pickler sends torch tensors through shared memory, one open
    file descriptor per tensor in the sending process for as long as the tensor lives; every
    model sent to the round process (and kept, as loaded versions are) would hold hundreds. A
    plain pickle copies the values instead: the process gets its own tensors, nobody keeps fds."""
    fn, args, kwargs = pickle.loads(payload)
    return pickle.dumps(fn(*args, **kwargs))


class RoundProcess:
    """The process rounds train in; ``chunk_call()`` gives one round its ``call``."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._round_ids = itertools.count(1)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_round_process,
                                                 initargs=(self.threads, os.getpid()))
            return self._pool

    def chunk_call(self) -> ChunkCall:
        """A ``call`` for :func:`run_chunked_round` that runs each chunk in the round process."""
        round_id = next(self._round_ids)

        def call(backend, reward_fn: RewardFn, config: TrainConfig, out: str | Path, state: RoundState | None,
                 budget_s: float, device: str | None = None, observe=None, pause_at: int | None = None,
                 hold: bool = False) -> ChunkOutcome:
            model = (backend, reward_fn) if state is None else None  # a round's first chunk carries the model
            return self.run(_chunk_in_round_process, round_id, model, config, str(out), state, budget_s, pause_at,
                            hold)

        return call

    def warm_up(self) -> int:
        """Start the process now (a fresh interpreter importing torch and the trainer: about 9 s
        on 2 cores) rather than when the first round needs it; returns its pid."""
        return self.run(os.getpid)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the round process (all picklable): a round's other model work,
        such as drawing its probe images, kept off the server's GIL too."""
        try:
            return pickle.loads(self._executor().submit(_call, pickle.dumps((fn, args, kwargs))).result())
        except BrokenProcessPool:
            self.close()
            raise RuntimeError("the training process ended unexpectedly (out of memory?): start the round "
                               "again") from None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
