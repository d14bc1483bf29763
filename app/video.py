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
    """The reward proxy's encoder: ``make_image_encoder``'s, used as it is for images, and for
    a video model when it takes clips (B, F, 3, H, W) (the built-in clip model's perception
    does); an image encoder (CLIP for AnimateDiff) is applied frame by frame."""
    from rlr_core.feedback.encoders import EncoderError, PerFrameClipEncoder, make_image_encoder

    if not backend.is_video:
        return make_image_encoder(spec, backend, device)
    try:
        encoder = make_image_encoder(spec, backend, device)
    except EncoderError:
        encoder = None
    if encoder is not None and takes_clips(encoder, backend):
        return encoder
    return PerFrameClipEncoder(encoder if encoder is not None else make_image_encoder("perception", None, device))


def takes_clips(encoder: Any, backend: Any) -> bool:
    """Whether ``encoder.embed`` maps a clip batch (1, F, 3, H, W) to (1, dim)."""
    h, w = backend.image_size
    try:
        with torch.no_grad():
            out = encoder.embed(torch.zeros(1, backend.frames, 3, h, w))
    except Exception:
        return False
    return tuple(out.shape) == (1, encoder.dim)
