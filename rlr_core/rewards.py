"""Differentiable rewards built on the frozen perception model, and the fidelity metric.

A reward is any callable (images in [0, 1] of shape (B, 3, H, W), prompts) -> (B,) tensor,
differentiable in the images. Named rewards for the CLI and the benchmarks:

    fidelity             sum over the attributes the prompt names of log p(attribute | image)
    prefer-large         log p(size = large | image)      (prefer-small likewise)
    prefer-<attr>:<v>    log p(attr = v | image), attr in kind, colour, size, position, background
    a+b                  the sum of two rewards, e.g. "fidelity+prefer-colour:red"
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch

from rlr_core import perception as perception_mod
from rlr_core import shapes_world as sw
from rlr_core.perception import PerceptionNet

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
_ALIASES = {"color": "colour"}


def load_perception(path: str | Path | None = None, device: str | torch.device = "cpu") -> PerceptionNet:
    path = Path(path) if path else perception_mod.DEFAULT_PERCEPTION_DIR
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no perception model at {path}; train one with `python -m rlr_core.perception`")
    return perception_mod.load(path, device)


class FidelityReward:
    """log p(every attribute the prompt names | image): 'does the image show the prompt'."""

    targets: frozenset[str] = frozenset()  # follows the prompt

    def __init__(self, perception: PerceptionNet):
        self.perception = perception

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = [sw.parse_caption(p) for p in prompts]
        return self.perception.log_prob_of(images.to(self._device), scenes).to(images.device)

    @property
    def _device(self) -> torch.device:
        return self.perception.coords.device


class AttributeReward:
    """log p(attribute = value | image), whatever the prompt says."""

    def __init__(self, perception: PerceptionNet, attribute: str, value: str):
        attribute = _ALIASES.get(attribute, attribute)
        if attribute not in sw.ATTRIBUTES or value not in sw.ATTRIBUTES[attribute]:
            raise ValueError(f"unknown attribute value {attribute}={value}; known: "
                             + "; ".join(f"{a}: {', '.join(v)}" for a, v in sw.ATTRIBUTES.items()))
        self.perception = perception
        self.attribute = attribute
        self.targets = frozenset({attribute})
        self.index = sw.ATTRIBUTES[attribute].index(value)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.to(self.perception.coords.device)
        logits = self.perception(x)[self.attribute]
        return logits.log_softmax(-1)[:, self.index].to(images.device)


class SumReward:
    def __init__(self, parts: list[RewardFn]):
        self.parts = parts
        self.targets = frozenset().union(*(targeted_attributes(p) for p in parts))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(part(images, prompts) for part in self.parts)


def make_reward(spec: str, perception: PerceptionNet | None = None) -> RewardFn:
    """A reward from its name (see the module docstring)."""
    perception = perception if perception is not None else load_perception()
    parts = [s.strip() for s in spec.split("+")]
    if len(parts) > 1:
        return SumReward([make_reward(p, perception) for p in parts])
    if spec == "fidelity":
        return FidelityReward(perception)
    if spec in ("prefer-large", "prefer-small"):
        return AttributeReward(perception, "size", spec.removeprefix("prefer-"))
    if spec.startswith("prefer-") and ":" in spec:
        attribute, value = spec.removeprefix("prefer-").split(":", 1)
        return AttributeReward(perception, attribute, value)
    raise ValueError(f"unknown reward {spec!r}: use fidelity, prefer-large, prefer-small, "
                     "prefer-<attribute>:<value>, or a sum like fidelity+prefer-colour:red")


def targeted_attributes(reward_fn: RewardFn) -> frozenset[str]:
    """The attributes a reward asks for regardless of the prompt (``prefer-colour:red`` ->
    {"colour"}); rewards that follow the prompt, or that say nothing, target none."""
    return getattr(reward_fn, "targets", frozenset())


@torch.no_grad()
def fidelity_accuracy(perception: PerceptionNet, images: torch.Tensor, prompts: list[str],
                      ignore: Collection[str] = ()) -> torch.Tensor:
    """Per image, the fraction of attributes named in its prompt that the perception model reads
    back (1 when the prompt names none). The benchmarks' prompt-fidelity metric.

    ``ignore`` leaves attributes out, e.g. the one a reward asks for whatever the prompt says
    (see :func:`targeted_attributes`): what is left shows reward hacking, not the reward's aim."""
    preds = perception.predict(images.to(perception.coords.device))
    out = []
    for pred, prompt in zip(preds, prompts):
        wanted = {a: v for a, v in sw.parse_caption(prompt).specified().items() if a not in ignore}
        out.append(sum(pred[a] == v for a, v in wanted.items()) / len(wanted) if wanted else 1.0)
    return torch.tensor(out)
