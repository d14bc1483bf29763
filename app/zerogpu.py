"""ZeroGPU: generation and training inside ``spaces.GPU`` functions.

On a ZeroGPU Space (``SPACES_ZERO_GPU`` set, as the ``spaces`` package detects it) the GPU
exists only inside decorated calls, each at most its declared duration, run in a forked worker
with pickled arguments and results. So:

- generation: the served model (kept on the CPU in the app's process) goes to the worker, draws
  there on the GPU, and the images come back on the CPU;
- training: a round runs as chunks of at most ``RLR_GPU_CHUNK_SECONDS`` (default 60) each, the
  adapter and optimiser state handed back on the CPU between calls
  (:mod:`rlr_core.training.chunked`), so a round survives many short GPU leases.

Off ZeroGPU nothing here changes the app: ``spaces.GPU`` is a no-op and the app draws and
trains in its own process as before. ``RLR_CHUNKED_TRAINING=1`` forces the chunked path
anywhere (on the CPU: to try it). The decorated functions are created at import time: ZeroGPU
looks for them when the app starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.errors import AppError
from rlr_core import sampler
from rlr_core.training.chunked import run_chunk
from rlr_core.training.devices import move_to

DEFAULT_CHUNK_SECONDS = 60.0
GENERATION_SECONDS = 30  # one Generate click (16 images at most) on a GPU


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in {"1", "t", "true", "yes", "on"}


def on_zero_gpu() -> bool:
    """Running on a ZeroGPU Space (the variable the ``spaces`` package reads)."""
    return _truthy("SPACES_ZERO_GPU")


def chunked_training() -> bool:
    return on_zero_gpu() or _truthy("RLR_CHUNKED_TRAINING")


def chunk_seconds() -> float:
    raw = os.environ.get("RLR_GPU_CHUNK_SECONDS", "")
    try:
        value = float(raw) if raw else DEFAULT_CHUNK_SECONDS
    except ValueError:
        raise AppError(f"RLR_GPU_CHUNK_SECONDS must be a number of seconds, not {raw!r}") from None
    if not 0 < value <= 3600:
        raise AppError(f"RLR_GPU_CHUNK_SECONDS must be more than 0 and at most 3600 seconds, not {raw}")
    return value


def _declared_chunk_seconds() -> float:
    try:
        return chunk_seconds()
    except AppError:  # said again, as the round's error, when a round starts
        return DEFAULT_CHUNK_SECONDS


def _gpu(duration: float) -> Callable[[Callable], Callable]:
    try:
        import spaces
    except ImportError:  # local installs need not have it: it is a no-op off Spaces anyway
        return lambda fn: fn
    return spaces.GPU(duration=max(1, round(duration)))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@torch.no_grad()
def draw_here(backend, prompts: list[str], seed: int, settings: sampler.SamplerSettings,
              row_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Images drawn in this process (see ``app.generation.draw``)."""
    if row_seeds is not None:
        return sampler.generate_per_row_seeds(backend, prompts, settings, row_seeds)
    return sampler.generate(backend, prompts, settings, seed=seed)


def _draw_on_gpu(backend, prompts: list[str], seed: int, settings: sampler.SamplerSettings,
                 row_seeds: Sequence[int] | None = None) -> torch.Tensor:
    move_to(backend, _device())
    return draw_here(backend, prompts, seed, settings, row_seeds).cpu()


draw_on_gpu = _gpu(GENERATION_SECONDS)(_draw_on_gpu)
train_chunk_on_gpu = _gpu(_declared_chunk_seconds())(run_chunk)


def run_round(backend, reward_fn, config, out, progress: Callable, stop, observe: Callable[[], Any] | None = None,
              on_observed: Callable[[Any], None] | None = None):
    """A training round as GPU-sized chunks (see the module docstring); ``run_round``'s result."""
    from rlr_core.training.chunked import run_chunked_round

    return run_chunked_round(backend, reward_fn, config, out, progress=progress, stop=stop,
                             chunk_seconds=chunk_seconds(), call=train_chunk_on_gpu, device="auto",
                             observe=observe, on_observed=on_observed)
