"""The pixel judge on the guard's own probe images: was the guard's verdict right?

The loop benchmark judges every version from the pixels on its own images (the rated prompts
and its held-out ones). The guard judges on other images: its probe set (the round's prompts,
their stage prompts and the backend's held-out prompts, each from its own fixed seed). When
the two disagree, either the guard's judge misread its probes or the probes show something the
benchmark's images do not. This module tells them apart: it redraws the guard's probes of a
version exactly as the guard drew them (the prompts, seeds, images per prompt and sample
settings read back from the guard's cache, ``fidelity_probes.json``) and reads them with the
pixel judge, through the guard's own ``measure`` and ``verdict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from app import fidelity_guard
from app.generation import GenerationSettings
from rlr_core.shapesworld import pixel_judge
from rlr_core.shapesworld import world as sw


class PixelJudge:
    """The pixel judge with the guard's judge interface (``accuracy`` per image, in [0, 1])."""

    name = "pixel"
    differentiable = False
    relative = False

    def wanted(self, prompt: str) -> dict[str, str]:
        return sw.parse_caption(prompt).specified()

    def judges(self, prompt: str) -> bool:
        return bool(self.wanted(prompt))

    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        fidelity = pixel_judge.prompt_fidelity(pixel_judge.read(images), prompts)
        return torch.tensor([1.0 if f is None else f for f in fidelity])


def probe_set(data_dir: Path, version_id: int, judge_name: str,
              per_prompt: int = fidelity_guard.PROBE_IMAGES) -> tuple[list[str], GenerationSettings, int] | None:
    """The prompts, sample settings and images per prompt the guard judged ``version_id`` on
    (from its cache; ``per_prompt``: the round's ``fidelity_probe_images``, as the in-round watch
    caches 2 per prompt); None when the guard cached nothing for it."""
    keys = [k for k in fidelity_guard.ProbeCache(data_dir).keys(version_id)
            if k.judge == judge_name and k.per_prompt == per_prompt]
    if not keys:
        return None
    first = keys[0]
    same_draw = [k for k in keys if (k.per_prompt, k.steps, k.guidance, k.eta) ==
                 (first.per_prompt, first.steps, first.guidance, first.eta)]
    return [k.prompt for k in same_draw], first.settings(), first.per_prompt


class PixelVerdicts:
    """Per version, its pixel-judged scores on the guard's probes (versions never change)."""

    def __init__(self, models: Any, data_dir: Path, judge_name: str):
        self.models, self.data_dir, self.judge_name = models, Path(data_dir), judge_name
        self.judge = PixelJudge()
        self._scores: dict[int, dict[str, float]] = {}

    def scores(self, version_id: int, prompts: list[str], settings: GenerationSettings,
               per_prompt: int) -> dict[str, float]:
        known = self._scores.setdefault(version_id, {})
        missing = [p for p in prompts if p not in known]
        known.update(fidelity_guard.measure(self.models.backend(version_id), self.judge, missing, settings,
                                            per_prompt))
        return {p: known[p] for p in prompts}

    def verdict(self, new_id: int, parent_id: int, base_id: int, threshold: float,
                per_prompt: int = fidelity_guard.PROBE_IMAGES, rule: str = "split") -> dict[str, Any] | None:
        """The guard's verdict on ``new_id`` with the pixel judge on the guard's own probes, read
        by the round's ``rule``."""
        found = probe_set(self.data_dir, new_id, self.judge_name, per_prompt)
        if found is None:
            return None
        prompts, settings, per_prompt = found
        prompts = [p for p in prompts if self.judge.judges(p)]
        new, parent, base = (self.scores(v, prompts, settings, per_prompt) for v in (new_id, parent_id, base_id))
        held_out = self.models.backend(base_id).held_out_prompts
        return fidelity_guard.verdict(self.judge, new, parent, base, threshold, held_out=held_out, rule=rule).metrics()
