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

Clip rewards (clips (B, F, 3, H, W) in [0, 1], judged by the clip perception model; a separate
registry, ``@register_clip``, picked when the judge is a ``ClipPerceptionNet`` or ``video=True``):

    fidelity                   sum over the attributes the caption names of log p(attribute | clip)
    prefer-fast, prefer-slow   log p(moving) + log p(speed | moving): the shape moves, at that speed
    prefer-still               log p(direction = still)
    prefer-<attr>:<v>          log p(attr = v | clip), attr in kind, colour, size, direction, speed,
                               background (e.g. prefer-direction:left, prefer-colour:red)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch

from rlr_core.estimators.backend_chain import RewardFn
from rlr_core.shapesworld import clip_perception as clip_perception_mod
from rlr_core.shapesworld import clips
from rlr_core.shapesworld import perception as perception_mod
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.clip_perception import ClipPerceptionNet
from rlr_core.shapesworld.perception import PerceptionNet

RewardFactory = Callable[[PerceptionNet, str | None], RewardFn]
REWARDS: dict[str, RewardFactory] = {}
ClipRewardFactory = Callable[[ClipPerceptionNet, str | None], RewardFn]
CLIP_REWARDS: dict[str, ClipRewardFactory] = {}
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


def make_reward(spec: str, perception: PerceptionNet | ClipPerceptionNet | None = None,
                video: bool = False) -> RewardFn:
    """A reward from its registered name, ``name:arg``, or a sum ``a+b`` (see the module docstring).
    Clip rewards when ``perception`` is the clip perception model or ``video`` is set."""
    video = video or isinstance(perception, ClipPerceptionNet)
    if perception is None:
        perception = load_clip_perception() if video else load_perception()
    parts = [s.strip() for s in spec.split("+")]
    if len(parts) > 1:
        return sum_of([make_reward(p, perception, video) for p in parts])
    name, _, arg = spec.partition(":")
    registry = CLIP_REWARDS if video else REWARDS
    if name not in registry:
        extra = ("prefer-fast, prefer-slow, prefer-still" if video else
                 "prefer-large, prefer-small, prefer-left, prefer-center, prefer-right")
        raise ValueError(f"unknown {'clip ' if video else ''}reward {spec!r}: use fidelity, {extra}, "
                         "prefer-<attribute>:<value>, or a sum like fidelity+prefer-colour:red")
    return registry[name](perception, arg or None)


@torch.no_grad()
def fidelity_accuracy(perception: PerceptionNet, images: torch.Tensor, prompts: list[str],
                      ignore: Collection[str] = ()) -> torch.Tensor:
    """Per image, the fraction of attributes named in its prompt that the perception model reads
    back (1 when the prompt names none). The benchmarks' prompt-fidelity metric.

    ``ignore`` leaves attributes out, e.g. the one a reward asks for whatever the prompt says
    (see :func:`targeted_attributes`): what is left shows reward hacking, not the reward's aim.
    Clips (with the clip perception model as ``perception``): a still clip's speed is not judged."""
    preds = perception.predict(images.to(perception.coords.device))
    parse = clips.parse_clip_caption if isinstance(perception, ClipPerceptionNet) else sw.parse_caption
    out = []
    for pred, prompt in zip(preds, prompts):
        wanted = {a: v for a, v in parse(prompt).specified().items() if a not in ignore}
        out.append(sum(pred[a] == v for a, v in wanted.items()) / len(wanted) if wanted else 1.0)
    return torch.tensor(out)


# ----------------------------------------------------------------------------- clip rewards
def register_clip(name: str) -> Callable[[ClipRewardFactory], ClipRewardFactory]:
    def add(factory: ClipRewardFactory) -> ClipRewardFactory:
        CLIP_REWARDS[name] = factory
        return factory
    return add


def load_clip_perception(path: str | Path | None = None, device: str | torch.device = "cpu") -> ClipPerceptionNet:
    return clip_perception_mod.load(path or clip_perception_mod.DEFAULT_CLIP_PERCEPTION_DIR, device)


@register_clip("fidelity")
def clip_fidelity(judge: ClipPerceptionNet, arg: str | None = None) -> RewardFn:
    """log p(every attribute the caption names | clip): 'does the clip show the prompt'."""
    def reward(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scenes = [clips.parse_clip_caption(p) for p in prompts]
        return judge.log_prob_of(_on_judge(judge, frames), scenes).to(frames.device)
    return targeting(reward, ())


def clip_prefer(judge: ClipPerceptionNet, attribute: str, value: str | None) -> RewardFn:
    """log p(attribute = value | clip), whatever the prompt says."""
    attribute = _ALIASES.get(attribute, attribute)
    if attribute not in clips.CLIP_ATTRIBUTES or value not in clips.CLIP_ATTRIBUTES[attribute]:
        raise ValueError(f"unknown clip attribute value {attribute}={value}; known: "
                         + "; ".join(f"{a}: {', '.join(v)}" for a, v in clips.CLIP_ATTRIBUTES.items()))
    if attribute == "speed":  # a speed means nothing without motion
        return clip_prefer_speed(judge, value)
    index = clips.CLIP_ATTRIBUTES[attribute].index(value)

    def reward(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logits = judge(_on_judge(judge, frames))[attribute]
        return logits.log_softmax(-1)[:, index].to(frames.device)
    return targeting(reward, {attribute})


def clip_prefer_speed(judge: ClipPerceptionNet, value: str) -> RewardFn:
    """log p(the shape moves) + log p(speed = value | moving)."""
    still = clips.CLIP_ATTRIBUTES["direction"].index("still")
    index = clips.CLIP_ATTRIBUTES["speed"].index(value)

    def reward(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logits = judge(_on_judge(judge, frames))
        p_still = logits["direction"].softmax(-1)[:, still]
        moving = torch.log1p(-p_still.clamp(max=1 - 1e-6))
        return (moving + logits["speed"].log_softmax(-1)[:, index]).to(frames.device)
    return targeting(reward, {"speed", "direction"})


register_clip("prefer-fast")(lambda judge, arg=None: clip_prefer_speed(judge, "fast"))
register_clip("prefer-slow")(lambda judge, arg=None: clip_prefer_speed(judge, "slow"))
register_clip("prefer-still")(lambda judge, arg=None: clip_prefer(judge, "direction", "still"))
for _attribute in [*clips.CLIP_ATTRIBUTES, *_ALIASES]:
    register_clip(f"prefer-{_attribute}")(lambda judge, arg=None, a=_attribute: clip_prefer(judge, a, arg))
