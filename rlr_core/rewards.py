"""Differentiable rewards: a registry of small named functions, and the fidelity metric.

A reward is a callable (images in [0, 1] of shape (B, 3, H, W), prompts) -> (B,) tensor,
differentiable in the images. Each registered name maps to a factory that builds one from the
frozen perception model (and, for parametrised names, the value after the colon):

    fidelity             sum over the attributes the prompt names of log p(attribute | image)
    prefer-large         log p(size = large | image)      (prefer-small likewise)
    prefer-left          log p(position = left | image)   (prefer-center, prefer-right likewise)
    prefer-<attr>:<v>    log p(attr = v | image), attr in kind, colour, size, position, background
    a+b                  the sum of two rewards, e.g. "fidelity+prefer-colour:red"

Add a reward with ``@register("name")`` on a factory ``(perception, arg) -> RewardFn``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch

from rlr_core.shapesworld import perception as perception_mod
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.perception import PerceptionNet

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
RewardFactory = Callable[[PerceptionNet, str | None], RewardFn]
REWARDS: dict[str, RewardFactory] = {}
_ALIASES = {"color": "colour"}


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
    def add(factory: RewardFactory) -> RewardFactory:
        REWARDS[name] = factory
        return factory
    return add


def targeting(fn: RewardFn, attributes: Collection[str]) -> RewardFn:
    """Mark the attributes ``fn`` asks for whatever the prompt says (see :func:`targeted_attributes`)."""
    fn.targets = frozenset(attributes)
    return fn


def targeted_attributes(reward_fn: RewardFn) -> frozenset[str]:
    """The attributes a reward asks for regardless of the prompt (``prefer-colour:red`` ->
    {"colour"}); rewards that follow the prompt, or that say nothing, target none."""
    return getattr(reward_fn, "targets", frozenset())


def load_perception(path: str | Path | None = None, device: str | torch.device = "cpu") -> PerceptionNet:
    path = Path(path) if path else perception_mod.DEFAULT_PERCEPTION_DIR
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no perception model at {path}; train one with `python -m rlr_core.shapesworld.perception`")
    return perception_mod.load(path, device)


def _on_judge(perception: PerceptionNet, images: torch.Tensor) -> torch.Tensor:
    return images.to(perception.coords.device)


@register("fidelity")
def fidelity(perception: PerceptionNet, arg: str | None = None) -> RewardFn:
    """log p(every attribute the prompt names | image): 'does the image show the prompt'."""
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = [sw.parse_caption(p) for p in prompts]
        return perception.log_prob_of(_on_judge(perception, images), scenes).to(images.device)
    return targeting(reward, ())


def prefer(perception: PerceptionNet, attribute: str, value: str | None) -> RewardFn:
    """log p(attribute = value | image), whatever the prompt says."""
    attribute = _ALIASES.get(attribute, attribute)
    if attribute not in sw.ATTRIBUTES or value not in sw.ATTRIBUTES[attribute]:
        raise ValueError(f"unknown attribute value {attribute}={value}; known: "
                         + "; ".join(f"{a}: {', '.join(v)}" for a, v in sw.ATTRIBUTES.items()))
    index = sw.ATTRIBUTES[attribute].index(value)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logits = perception(_on_judge(perception, images))[attribute]
        return logits.log_softmax(-1)[:, index].to(images.device)
    return targeting(reward, {attribute})


register("prefer-large")(lambda perception, arg=None: prefer(perception, "size", "large"))
register("prefer-small")(lambda perception, arg=None: prefer(perception, "size", "small"))
# Composition rewards: what is drawn where and how big, settled in the coarse stage of the chain.
for _position in sw.POSITIONS:
    register(f"prefer-{_position}")(lambda perception, arg=None, v=_position: prefer(perception, "position", v))
COMPOSITION: dict[str, tuple[str, str]] = {  # reward name -> (attribute, value) it prefers
    "prefer-small": ("size", "small"), "prefer-large": ("size", "large"),
    **{f"prefer-{v}": ("position", v) for v in sw.POSITIONS},
}
for _attribute in [*sw.ATTRIBUTES, *_ALIASES]:
    register(f"prefer-{_attribute}")(lambda perception, arg=None, a=_attribute: prefer(perception, a, arg))


def sum_of(parts: list[RewardFn]) -> RewardFn:
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(part(images, prompts) for part in parts)
    return targeting(reward, frozenset().union(*(targeted_attributes(p) for p in parts)))


def make_reward(spec: str, perception: PerceptionNet | None = None) -> RewardFn:
    """A reward from its registered name, ``name:arg``, or a sum ``a+b`` (see the module docstring)."""
    perception = perception if perception is not None else load_perception()
    parts = [s.strip() for s in spec.split("+")]
    if len(parts) > 1:
        return sum_of([make_reward(p, perception) for p in parts])
    name, _, arg = spec.partition(":")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {spec!r}: use fidelity, prefer-large, prefer-small, prefer-left, "
                         "prefer-center, prefer-right, prefer-<attribute>:<value>, "
                         "or a sum like fidelity+prefer-colour:red")
    return REWARDS[name](perception, arg or None)


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
