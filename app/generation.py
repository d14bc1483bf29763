"""Draw images with a model version and put them in the feedback store as samples.

A batch shares one seed; image ``i`` of a batch is reproducible from (prompt list, seed,
steps, guidance, its index). The before/after pairs rely on that: the same prompts and seed
through two versions give two images made from the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from app import zerogpu
from feedback_store import FeedbackStore
from rlr_core import dcot, sampler
from rlr_core.backends.base import DiffusionBackend

# The app draws with the sampler's own settings (steps, eta, guidance); one type, not two.
GenerationSettings = sampler.SamplerSettings


# draw's signature: what code that may draw elsewhere (a round's process) takes instead of it
DrawFn = Callable[..., torch.Tensor]


def draw(backend: DiffusionBackend, prompts: Sequence[str], seed: int, settings: GenerationSettings,
         row_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (clips (B, F, 3, H, W)), on the CPU when drawn on a GPU.
    ``row_seeds``: each run of equal seeds drawn as if alone (``sampler.generate_per_row_seeds``;
    ``seed`` is then unused). On a ZeroGPU Space they are drawn inside a ``spaces.GPU`` call
    (:mod:`app.zerogpu`)."""
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
