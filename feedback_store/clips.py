"""Clips in the store: one lossless animated PNG per clip, plus the SHA-256 of its frames.

An animated PNG (APNG) is still a PNG: its first frame is what any PNG reader shows, browsers
play it (looping), and it keeps every frame's pixels exactly. So a clip lives where an image
does (``images/<h[:2]>/<h>.png``, ``h`` the file's SHA-256) and every rule for image files
holds for it unchanged: atomic writes, hash-checked served copies, export and import.

The frames' own hash (over their raw RGB bytes and shape) names the clip's content apart
from how it was encoded; the store records it in the sample's settings (``frames_sha256``,
with ``frames``, the frame count).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from feedback_store.images import to_pil

FRAME_MS = 125  # 8 frames per second: an 8-frame clip loops once a second


def is_clip(value: Any) -> bool:
    """A clip is (F, 3, H, W) (a torch tensor) or (F, H, W, 3) (an array), or a list of frames."""
    if isinstance(value, list | tuple):  # of PIL images or (H, W, 3) / (3, H, W) frames
        return len(value) > 0 and all(isinstance(f, Image.Image) or len(getattr(f, "shape", ())) == 3
                                      for f in value)
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 4


def frames_of(clip: Any) -> list[Image.Image]:
    """A clip's frames as RGB PIL images (each frame as ``to_pil`` accepts it)."""
    if not is_clip(clip):
        raise ValueError("a clip must be (F, 3, H, W), (F, H, W, 3) or a list of frames")
    frames = [to_pil(frame) for frame in clip]
    if len({f.size for f in frames}) != 1:
        raise ValueError("every frame of a clip must have the same size")
    return frames


def frames_sha256(frames: list[Image.Image]) -> str:
    """SHA-256 of the frames' RGB bytes, with the shape first (so a reshaped clip differs)."""
    array = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])
    h = hashlib.sha256(f"{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def encode_apng(frames: list[Image.Image], frame_ms: int = FRAME_MS) -> bytes:
    """Lossless animated PNG that loops forever (a single frame gives a plain PNG).

    Pillow merges a frame identical to the one before it into that one (a shape standing still
    would lose frames) unless the two differ in blend mode; so the blend mode alternates between
    "source" and "over", which draw an opaque RGB frame the same way."""
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=len(frames) > 1, append_images=frames[1:],
                   duration=frame_ms, loop=0, disposal=0,
                   blend=[i % 2 for i in range(len(frames))], optimize=False)
    return buf.getvalue()


def read_frames(source: str | Path | bytes) -> np.ndarray:
    """Every frame of a PNG or animated PNG as uint8 (F, H, W, 3); a still image is one frame."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        frames = []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(frames)


def upscale(frames: list[Image.Image], scale: int) -> list[Image.Image]:
    """Enlarged pixel-art style (nearest neighbour), for previews that cannot be scaled by CSS."""
    if scale <= 1:
        return frames
    return [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
