"""Model images (tensors in [0, 1]) to PIL, for any backend and any resolution.

Small images (the built-in model's 32x32) are enlarged pixel-art style for display; large ones
(Stable Diffusion's 512x512) are shown as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

PIXEL_ART_BELOW = 128  # images smaller than this (on their longer side) are enlarged without smoothing
DISPLAY_SIZE = 256  # ... to about this many pixels


def to_pil(image: torch.Tensor | np.ndarray, scale: int = 1) -> Image.Image:
    """A (3, H, W) tensor or an (H, W, 3) array in [0, 1] as a PIL image, enlarged ``scale`` times (nearest)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    return pil


def is_pixel_art(size: tuple[int, int]) -> bool:
    return max(size) < PIXEL_ART_BELOW


def display_scale(size: tuple[int, int]) -> int:
    """How many times to enlarge an image of ``size`` (H, W) for display: 8 for 32x32, 1 for 512x512."""
    return max(1, DISPLAY_SIZE // max(size)) if is_pixel_art(size) else 1


def display_height(size: tuple[int, int]) -> int:
    """Height in CSS pixels of the big rating view: 256 for small images, up to 512 for large ones."""
    return DISPLAY_SIZE if is_pixel_art(size) else min(512, max(DISPLAY_SIZE, size[0]))
