"""An independent pixel-level judge of ShapesWorld images: no network, nothing to fool.

The perception model is differentiable, so a reward built on it can be raised by adversarial
pixel changes that a person would not see as the reward's aim. This judge measures from the
pixels alone, with fixed arithmetic:

- background colour: the median of the one-pixel border (a shape covers little of it);
- foreground: pixels whose colour is farther from the background than half the image's
  contrast (the mean distance of its 8 farthest pixels); area = their count, centroid = their
  mean pixel centre; under MIN_AREA pixels there is no shape (a speck is not a small shape);
- size, position and background read from those by the thresholds of the world's geometry
  (ShapesWorld renders small shapes with half-extent 4.5 px, large ones 8.5 px, centres at
  x = 9 / 16 / 23);
- kind from the fill ratio of the soft coverage (each pixel's distance from the background
  over the contrast, clipped to [0, 1]): its sum over the product of its width and height
  profiles (a triangle fills about half of that box, a circle pi/4, a square all of it), and
  colour as the palette colour nearest the foreground's median colour;
- prompt fidelity (:func:`prompt_fidelity`): per image, the fraction of the attributes its
  prompt names that the pixels show;
- image quality: noise energy of the background (RMS of the high-pass residual over background
  pixels away from the shape) and edge sharpness (the strongest colour steps relative to the
  contrast) against fresh renders of the same caption.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rlr_core.shapesworld import world as sw

# Area in pixels between the largest small shape (a circle of half-extent 4.5 x 1.1: ~77 px)
# and the smallest large one (a triangle of half-extent 8.5 x 0.9: ~105 px).
SIZE_THRESHOLD = 90.0
# Centroid x between the position centres (9, 16, 23; jitter +-1.5).
POSITION_THRESHOLDS = (12.5, 19.5)
MIN_CONTRAST = 0.15  # below this the image shows no shape at all
# Below this many foreground pixels there is no shape, only a speck: the smallest shape the world
# renders (a small triangle, half-extent 4.5 x 0.9) covers ~30 px. Shrinking the shape to a dot
# must not count as "small".
MIN_AREA = 20.0
# Soft fill ratio between a triangle's (0.53-0.63 on fresh renders) and a circle's (0.76-0.82),
# and between a circle's and a square's (0.96-1.0).
FILL_THRESHOLDS = (0.68, 0.88)
MIN_COVERAGE = 0.15  # coverage below this is background texture, not shape
_TOP = 8  # pixels that define the contrast


@dataclass(frozen=True)
class Reading:
    """What the pixels say about one image."""

    background: str
    size: str | None  # None when no shape was found (no foreground, or a speck under MIN_AREA)
    position: str | None
    area: float  # foreground pixels
    centroid_x: float
    contrast: float
    kind: str | None = None  # None when no shape was found
    colour: str | None = None

    def value(self, attribute: str) -> str | None:
        return getattr(self, attribute)


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    images = images.detach().float().cpu()
    return images[None] if images.dim() == 3 else images


def border_colour(images: torch.Tensor) -> torch.Tensor:
    """(B, 3): the median colour of each image's one-pixel border."""
    x = _as_batch(images)
    ring = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    return ring.median(dim=2).values


def foreground_masks(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask (B, H, W) bool, background colour (B, 3), contrast (B,))."""
    x = _as_batch(images)
    bg = border_colour(x)
    dist = (x - bg[:, :, None, None]).norm(dim=1)  # (B, H, W)
    contrast = dist.flatten(1).topk(_TOP, dim=1).values.mean(1)
    mask = (dist > 0.5 * contrast[:, None, None]) & (contrast[:, None, None] >= MIN_CONTRAST)
    return mask, bg, contrast


def nearest(colour: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    d = (torch.tensor([palette[n] for n in names]) - colour[None]).norm(dim=1)
    return names[int(d.argmin())]


def read(images: torch.Tensor) -> list[Reading]:
    """One :class:`Reading` per image of (B, 3, H, W) in [0, 1]."""
    mask, bg, contrast = foreground_masks(images)
    width = mask.shape[-1]
    xs = torch.arange(width, dtype=torch.float32) + 0.5  # pixel centres, the renderer's coordinates
    x = _as_batch(images)
    out = []
    for m, b, c, image in zip(mask, bg, contrast, x):
        area = float(m.sum())
        cx = float((m.float().sum(0) * xs).sum() / area) if area else float("nan")
        size = position = kind = colour = None
        if area >= MIN_AREA:
            size = "large" if area > SIZE_THRESHOLD else "small"
            lo, hi = POSITION_THRESHOLDS
            position = "left" if cx < lo else "center" if cx < hi else "right"
            fill = soft_fill(image, b, c)
            kind = "triangle" if fill < FILL_THRESHOLDS[0] else "circle" if fill < FILL_THRESHOLDS[1] else "square"
            colour = nearest(image[:, m].median(dim=1).values, sw.COLOURS)
        out.append(Reading(nearest(b, sw.BACKGROUNDS), size, position, area, cx, float(c), kind, colour))
    return out


def soft_fill(image: torch.Tensor, background: torch.Tensor, contrast: torch.Tensor) -> float:
    """The soft coverage's sum over (width profile sum) x (height profile sum), see the module docstring."""
    coverage = ((image - background[:, None, None]).norm(dim=0) / contrast.clamp(min=1e-6)).clamp(0, 1)
    coverage = torch.where(coverage < MIN_COVERAGE, torch.zeros_like(coverage), coverage)
    box = float(coverage.max(0).values.sum() * coverage.max(1).values.sum())
    return float(coverage.sum()) / box if box > 0 else 0.0


def prompt_fidelity(readings: Sequence[Reading], prompts: Sequence[str]) -> list[float | None]:
    """Per image, the fraction of the attributes its prompt names that the pixels show
    (None for a prompt that names none)."""
    out: list[float | None] = []
    for r, prompt in zip(readings, prompts):
        wanted = sw.parse_caption(prompt).specified()
        out.append(sum(r.value(a) == v for a, v in wanted.items()) / len(wanted) if wanted else None)
    return out


def agreement(readings: Sequence[Reading], attribute: str, value: str) -> float:
    """Fraction of images the judge reads as ``attribute = value``."""
    return sum(r.value(attribute) == value for r in readings) / max(len(readings), 1)


# --- image quality ------------------------------------------------------------------------


def background_noise(images: torch.Tensor) -> torch.Tensor:
    """(B,): RMS of the high-pass residual (pixel minus its 3x3 mean) over background pixels at
    least two pixels from the shape: grain and speckle on what should be a flat background."""
    x = _as_batch(images)
    mask, _, _ = foreground_masks(x)
    near_shape = F.max_pool2d(mask[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
    residual = x - F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    energy = residual.pow(2).mean(1)  # (B, H, W)
    keep = ~near_shape
    # the border's residuals are one-sided: leave them out
    keep[:, :1], keep[:, -1:], keep[:, :, :1], keep[:, :, -1:] = False, False, False, False
    return torch.stack([e[k].mean().sqrt() if k.any() else torch.tensor(float("nan")) for e, k in zip(energy, keep)])


def edge_sharpness(images: torch.Tensor) -> torch.Tensor:
    """(B,): the mean of the 16 largest neighbour colour steps, over the image's contrast. A crisp
    anti-aliased edge steps by most of the contrast in one pixel; a blurred one by a fraction."""
    x = _as_batch(images)
    _, _, contrast = foreground_masks(x)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).norm(dim=1).flatten(1)
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).norm(dim=1).flatten(1)
    steps = torch.cat([dx, dy], dim=1).topk(16, dim=1).values.mean(1)
    return steps / contrast.clamp(min=MIN_CONTRAST)


def reference_renders(prompts: Sequence[str], per_prompt: int = 4, seed: int = 0) -> torch.Tensor:
    """Fresh renders of each prompt (open attributes filled at random), (len * per_prompt, 3, H, W)."""
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    arrays = [sw.render(sw.parse_caption(p).complete(pyrng), rng) for p in prompts for _ in range(per_prompt)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def quality(images: torch.Tensor, prompts: Sequence[str], per_prompt: int = 4, seed: int = 0,
            noise_scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Per image: ``noise`` (background noise energy), ``noise_ref`` (the same on fresh renders of
    its prompt), ``sharpness`` (relative to the renders' mean; 1 = as crisp as a render) and
    ``quality`` = min(1, sharpness) x exp(-max(0, noise - noise_ref) / noise_scale), in [0, 1]:
    1 for a render-like image, lower for blur and for a grainy background."""
    x = _as_batch(images)
    refs = reference_renders(prompts, per_prompt, seed)
    ref_noise = background_noise(refs).view(len(prompts), per_prompt).nanmean(1)
    ref_sharp = edge_sharpness(refs).view(len(prompts), per_prompt).mean(1)
    noise = background_noise(x).nan_to_num(1.0)  # no background at all: as bad as it gets
    sharp = edge_sharpness(x) / ref_sharp
    q = sharp.clamp(max=1.0) * torch.exp(-(noise - ref_noise).clamp(min=0) / noise_scale)
    return {"noise": noise, "noise_ref": ref_noise, "sharpness": sharp, "quality": q}
