"""What the pages need to know about the loaded model, fixed at start-up and read-only.

The tabs build their layout from this (image size, example prompts, image or clip) instead of
reaching into the backend; nothing here can sample, train or change the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlr_core.backends.base import DiffusionBackend


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str  # the key of app/round_config.py's per-family defaults
    is_video: bool
    frames: int
    image_size: tuple[int, int]  # (height, width)
    example_prompts: tuple[str, ...]
    prompt_rules: bool  # the built-in grammar: stage prompts are split by rules
    device: str
    dtype: str
    anchor_prompts: int = 0  # how many the model lists (the round setting anchor_kl needs some)

    @classmethod
    def of(cls, backend: DiffusionBackend) -> ModelInfo:
        return cls(name=backend.name, family=backend.family, is_video=backend.is_video, frames=backend.frames,
                   image_size=tuple(backend.image_size), example_prompts=tuple(backend.example_prompts),
                   prompt_rules=bool(backend.prompt_rules), device=str(backend.device),
                   dtype=str(backend.dtype).removeprefix("torch."), anchor_prompts=len(backend.anchor_prompts))

    def noun(self, plural: bool = False) -> str:
        """'clip' or 'image', for labels and messages."""
        word = "clip" if self.is_video else "image"
        return word + "s" if plural else word

    def device_summary(self) -> str:
        h, w = self.image_size
        size = f"{self.frames} frames of {w}x{h}" if self.is_video else f"{w}x{h}"
        return f"{self.name} on {self.device}, {self.dtype}, {size} ({torch.get_num_threads()} torch thread(s))"
