"""A training round as a series of short calls, each within a time limit (ZeroGPU leases).

On a ZeroGPU Space the GPU exists only inside functions decorated with ``spaces.GPU``, each
call lasts at most its declared duration, and the call runs in a forked worker that receives
pickled arguments and returns a pickled result. A round of several minutes therefore runs as
chunks: :func:`run_chunk` takes the model, the reward and the round's state so far (all on the
CPU), trains until its time budget is nearly spent, and returns the next state on the CPU;
:func:`run_chunked_round` calls it until the round is done. For a given seed the chunked round
takes exactly the steps of an unchunked one (tests/test_chunked_round.py).

    result = run_chunked_round(backend, reward_fn, config, out, chunk_seconds=60,
                               call=spaces.GPU(duration=60)(run_chunk))

Stopping and progress reports happen between chunks (``stop`` cannot cross into a worker).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlr_core.backends.base import DiffusionBackend
from rlr_core.estimators.backend_chain import RewardFn
from rlr_core.training.devices import move_to
from rlr_core.training.resume import RoundState
from rlr_core.training.round import Progress, ProgressFn, RoundResult, TrainConfig, run_round

# Share of a chunk's duration kept free for moving weights to the device and back and for
# (un)pickling: a chunk pauses before a step that would end past the rest.
SAFETY = 0.25


@dataclass
class ChunkOutcome:
    result: RoundResult  # a paused round (state set, no version), or the finished round
    progress: list[Progress] = field(default_factory=list)  # the steps this chunk took
    observed: list[Any] = field(default_factory=list)  # observe() after each of those steps


def chunk_budget(chunk_seconds: float) -> float:
    return max(0.0, chunk_seconds * (1 - SAFETY))


def run_chunk(backend: DiffusionBackend, reward_fn: RewardFn, config: TrainConfig, out: str | Path,
              state: RoundState | None, budget_s: float, device: str | None = None,
              observe: Callable[[], Any] | None = None, pause_at: int | None = None,
              hold: bool = False) -> ChunkOutcome:
    """One chunk of a round (module level, so a ZeroGPU worker can unpickle it).

    ``device``: where to train ("auto" = CUDA when the worker has it); the returned state is
    on the CPU whatever the device. ``observe``: called after each step (e.g. a reward's
    side statistics), its values come back with the progress. ``pause_at`` and ``hold``: as
    :func:`rlr_core.training.round.run_round` takes them."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        move_to(backend, device)
        move_to(reward_fn, device)
    outcome = ChunkOutcome(result=RoundResult(None, {}, False))

    def record(p: Progress) -> None:
        outcome.progress.append(p)
        outcome.observed.append(observe() if observe is not None else None)

    outcome.result = run_round(backend, reward_fn, config, out, progress=record, resume=state, budget_s=budget_s,
                               pause_at=pause_at, hold=hold)
    return outcome


ChunkCall = Callable[..., ChunkOutcome]


def run_chunked_round(backend: DiffusionBackend, reward_fn: RewardFn, config: TrainConfig, out: str | Path,
                      progress: ProgressFn | None = None, stop: threading.Event | None = None,
                      chunk_seconds: float = 60.0, call: ChunkCall = run_chunk, device: str | None = None,
                      observe: Callable[[], Any] | None = None,
                      on_observed: Callable[[Any], None] | None = None, check_every: int = 0,
                      on_check: Callable[[RoundState], bool] | None = None, chunk_steps: int = 0) -> RoundResult:
    """Run a round as chunks of at most ``chunk_seconds`` each; same result as ``run_round``.

    ``call`` runs one chunk: :func:`run_chunk` itself (in this process), or it wrapped by
    ``spaces.GPU`` or sent to another process. ``on_observed`` gets each step's ``observe()``
    value just before ``progress`` gets the step. With ``on_check``, chunks also end every
    ``check_every`` steps and after the last one, and ``on_check`` sees the round's state there
    (it may change ``state.params``; True ends the round with them); the version is then written
    here, not in the call. ``chunk_steps`` (with ``on_check``): a chunk takes at most this many
    steps (1: ``progress`` can end the round after any step, as in an unchunked round). The
    metrics gain ``chunks`` (calls made)."""
    state: RoundState | None = None
    chunks = 0
    while True:
        if stop is not None and stop.is_set():
            break
        checks = {}
        if on_check is not None:
            done = state.step if state is not None else 0
            stops = [done + check_every - done % check_every] if check_every > 0 else []
            stops += [done + chunk_steps] if chunk_steps > 0 else []
            checks = {"hold": True, "pause_at": min(stops) if stops else None}
        outcome = call(backend, reward_fn, config, out, state, chunk_budget(chunk_seconds), device, observe,
                       **checks)
        chunks += 1
        asked_to_stop = False
        for p, seen in zip(outcome.progress, outcome.observed):
            if on_observed is not None:
                on_observed(seen)
            if progress is not None and progress(p):
                asked_to_stop = True
        if outcome.result.state is None:  # the round finished (or diverged inside the call)
            outcome.result.metrics["chunks"] = chunks
            return outcome.result
        state = outcome.result.state
        if asked_to_stop or state.step >= config.steps:
            break
        if on_check is not None and check_every > 0 and state.step % check_every == 0 and on_check(state):
            break
    if state is not None and on_check is not None and state.step >= config.steps and not asked_to_stop:
        on_check(state)  # the last step's check: it may put back the last good weights
    # Stopped between chunks, or held after the last step: write what was trained, as run_round does.
    halt = threading.Event()
    halt.set()
    result = run_round(backend, reward_fn, config, out, stop=halt, resume=state)
    result.metrics["chunks"] = chunks
    return result
