"""What the app does differently for a video model: any backend with ``is_video`` whose
``decode`` gives clips (B, F, 3, H, W) in [0, 1] (the built-in clip model, AnimateDiff).

Everything else is shared with images: a clip is stored as one animated PNG
(:mod:`feedback_store.clips`), served, rated, compared, exported and trained on exactly as an
image is. This module holds the few differences: words, preview files, and
the reward proxy's clip encoder.
"""

from __future__ import annotations

from typing import Any

import torch

from feedback_store import clips
from rlr_core.backends.base import DiffusionBackend
from rlr_core.images import to_pil


def noun(backend: DiffusionBackend, plural: bool = False) -> str:
    """'clip' or 'image', for labels and messages."""
    word = "clip" if backend.is_video else "image"
    return word + "s" if plural else word


def png_bytes(media: torch.Tensor, scale: int = 1) -> bytes:
    """A decoded image (3, H, W) as PNG, or a clip (F, 3, H, W) as a looping animated PNG,
    enlarged ``scale`` times without smoothing."""
    if media.dim() == 4:
        frames = clips.upscale([to_pil(f) for f in media], scale)
        return clips.encode_apng(frames)
    import io

    buf = io.BytesIO()
    to_pil(media, scale=scale).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- reward encoder
def reward_encoder(spec: str, backend: Any, device: str | torch.device = "cpu"):
    """The reward proxy's encoder: ``make_image_encoder(..., for_clips=True)`` (which keeps an
    encoder that takes clips, and applies an image encoder frame by frame on a video model)."""
    from rlr_core.feedback.encoders import make_image_encoder

    return make_image_encoder(spec, backend, device, for_clips=True)


def takes_clips(encoder: Any, backend: Any) -> bool:
    """Whether ``encoder.embed`` maps a clip batch (1, F, 3, H, W) to (1, dim)
    (:func:`rlr_core.feedback.encoders.takes_clips`)."""
    from rlr_core.feedback.encoders import takes_clips as check

    return check(encoder, backend)
