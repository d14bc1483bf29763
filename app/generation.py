"""Draw images with a model version and put them in the feedback store as samples.

A batch shares one seed; image ``i`` of a batch is reproducible from (prompt list, seed,
steps, guidance, its index). The before/after pairs rely on that: the same prompts and seed
through two versions give two images made from the same noise.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from app import zerogpu
from feedback_store import FeedbackStore
from rlr_core import dcot, sampler
from rlr_core.backends.base import DiffusionBackend

# The app draws with the sampler's own settings (steps, eta, guidance); one type, not two.
GenerationSettings = sampler.SamplerSettings


# draw's signature: what code that may draw elsewhere (a round's process) takes instead of it
DrawFn = Callable[..., torch.Tensor]


class DrawActivity:
    """The draws someone is waiting for in this process, and when the last one ended: work that
    can wait (the guard's probes drawn ahead, app/guard_prefetch.py) draws only while this is quiet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_end = float("-inf")

    @contextlib.contextmanager
    def drawing(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_end = time.monotonic()

    def quiet_for(self) -> float:
        """Seconds since the last draw ended; 0 while one runs."""
        with self._lock:
            return 0.0 if self._in_flight else time.monotonic() - self._last_end


ACTIVITY = DrawActivity()


def draw(backend: DiffusionBackend, prompts: Sequence[str], seed: int, settings: GenerationSettings,
         row_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (clips (B, F, 3, H, W)), on the CPU when drawn on a GPU.
    ``row_seeds``: each run of equal seeds drawn as if alone (``sampler.generate_per_row_seeds``;
    ``seed`` is then unused). On a ZeroGPU Space they are drawn inside a ``spaces.GPU`` call
    (:mod:`app.zerogpu`)."""
    with ACTIVITY.drawing():
        if zerogpu.on_zero_gpu():
            return zerogpu.draw_on_gpu(backend, list(prompts), seed, settings, row_seeds)
        return zerogpu.draw_here(backend, list(prompts), seed, settings, row_seeds)


def store_images(store: FeedbackStore, images: torch.Tensor, prompts: Sequence[str], seed: int,
                 settings: GenerationSettings, version_id: int | None,
                 stage_prompts: Sequence[dcot.StagePrompts | None] | None = None,
                 origin: str = "generate") -> list[int]:
    """Add each image as a sample (with everything needed to redraw it); return their ids."""
    ids = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        st = stage_prompts[i] if stage_prompts else None
        meta = {"steps": settings.steps, "guidance": settings.guidance, "eta": settings.eta,
                "batch_index": i, "batch_size": len(prompts), "origin": origin}
        ids.append(store.add_sample(image, prompt, seed=seed, settings=meta, model_version_id=version_id,
                                    stage_prompts=st.as_list() if st else None))
    return ids
