"""What the app does differently for a video model: any backend with ``is_video`` whose
``decode`` gives clips (B, F, 3, H, W) in [0, 1] (the built-in clip model, AnimateDiff).

Everything else is shared with images: a clip is stored as one animated PNG
(:mod:`feedback_store.clips`), served, rated, compared, exported and trained on exactly as an
image is. This module holds the few differences: words, example prompts, preview files, and
the reward proxy's clip encoder.
"""

from __future__ import annotations

from typing import Any

import torch

from feedback_store import clips
from rlr_core.images import to_pil

# Prompts of the built-in clip grammar (rlr_core/shapesworld/clips.py).
CLIP_EXAMPLES = [
    "a large red circle moving fast to the right, black background",
    "a small blue square moving slowly up, white background",
    "a yellow triangle standing still, navy background",
    "a large green triangle moving left",
]


def is_video(backend: Any) -> bool:
    return bool(getattr(backend, "is_video", False))


def noun(backend: Any, plural: bool = False) -> str:
    """'clip' or 'image', for labels and messages."""
    word = "clip" if is_video(backend) else "image"
    return word + "s" if plural else word


def builtin_clip_model(backend: Any) -> bool:
    from rlr_core.backends.builtin_clips import BuiltinClipBackend

    return isinstance(backend, BuiltinClipBackend)


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
    from rlr_core.feedback.encoders import EncoderError, make_image_encoder

    if not is_video(backend):
        return make_image_encoder(spec, backend, device)
    try:
        encoder = make_image_encoder(spec, backend, device)
    except EncoderError:
        encoder = None
    if encoder is not None and takes_clips(encoder, backend):
        return encoder
    return per_frame_clip_encoder(encoder, device)


def takes_clips(encoder: Any, backend: Any) -> bool:
    """Whether ``encoder.embed`` maps a clip batch (1, F, 3, H, W) to (1, dim)."""
    frames = int(getattr(backend, "num_frames", backend.state_shape[0]))
    h, w = backend.image_size
    try:
        with torch.no_grad():
            out = encoder.embed(torch.zeros(1, frames, 3, h, w))
    except Exception:
        return False
    return tuple(out.shape) == (1, encoder.dim)


# For video models whose encoder reads images: the image encoder on every frame; features = the
# mean over frames and the change from the first frame to the last (so the proxy sees motion,
# crudely).
def per_frame_clip_encoder(image_encoder: Any = None, device: str | torch.device = "cpu"):
    from rlr_core.feedback.reward_proxy import PerceptionImageEncoder

    inner = image_encoder if image_encoder is not None else PerceptionImageEncoder()
    if image_encoder is None:
        inner.model.to(device)

    class PerFrameClipEncoder:
        name = f"per-frame-{inner.name}"
        spec = "per-frame:" + str(getattr(inner, "spec", inner.name))
        dim = 2 * inner.dim

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 4:  # an image is a one-frame clip
                x = x.unsqueeze(1)
            b, f = x.shape[:2]
            emb = inner.embed(x.flatten(0, 1)).view(b, f, -1)
            return torch.cat([emb.mean(1), emb[:, -1] - emb[:, 0]], dim=1)

        def fingerprint(self) -> str:
            return f"{inner.fingerprint()}-frames"

    return PerFrameClipEncoder()
