"""Simulated raters: programmatic people with a taste in ShapesWorld images, for tests and benchmarks.

A rater sees an image only through the perception model (its predicted attribute
probabilities), so it judges generated images as well as renders. Its latent utility
``score(images, prompts)`` lies in [0, 1]; its answers are noisy:
- comparisons: skip with probability ``skip_prob``; when the two utilities are within
  ``tie_margin``, a tie with probability ``tie_prob`` (both-good if their mean is >= 0.5, else
  both-bad); otherwise Bradley-Terry, P(left) = sigmoid((u_left - u_right) / temperature);
- stars: 1 + 4 * (u + Gaussian noise), rounded and clipped to 1..5.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.perception import PerceptionNet

Probs = dict[str, torch.Tensor]  # attribute -> (B, n_values) probabilities
Utility = Callable[[Probs, Sequence[sw.PartialScene]], torch.Tensor]  # -> (B,) in [0, 1]


def attribute_preference(weights: dict[tuple[str, str], float]) -> Utility:
    """Utility = weighted mean of P(attribute = value) over the liked (attribute, value) pairs."""
    for attr, value in weights:
        if value not in sw.ATTRIBUTES.get(attr, ()):
            raise ValueError(f"unknown attribute value {attr}={value!r}")
    if any(w <= 0 for w in weights.values()):
        raise ValueError("preference weights must be positive")
    total = sum(weights.values())

    def utility(probs: Probs, scenes: Sequence[sw.PartialScene]) -> torch.Tensor:
        u = sum(w * probs[a][:, sw.ATTRIBUTES[a].index(val)] for (a, val), w in weights.items())
        return u / total

    return utility


def prompt_fidelity(probs: Probs, scenes: Sequence[sw.PartialScene]) -> torch.Tensor:
    """Utility = mean over the attributes the prompt specifies of P(image shows that value)."""
    rows = []
    for i, scene in enumerate(scenes):
        terms = [probs[a][i, sw.ATTRIBUTES[a].index(val)] for a, val in scene.specified().items()]
        rows.append(torch.stack(terms).mean() if terms else probs["kind"].new_tensor(0.5))
    return torch.stack(rows)


@dataclasses.dataclass
class SimulatedRater:
    name: str
    perception: PerceptionNet
    utility: Utility
    temperature: float = 0.1
    tie_margin: float = 0.05
    tie_prob: float = 0.5
    skip_prob: float = 0.03
    star_noise: float = 0.08
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Latent utility in [0, 1] of each (B, 3, 32, 32) image for its prompt; differentiable."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        probs = {k: v.softmax(-1) for k, v in self.perception(images).items()}
        return self.utility(probs, [sw.parse_caption(p) for p in prompts])

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)

    @torch.no_grad()
    def compare(self, left: torch.Tensor, right: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        """One answer per pair: left, right, tie-both-good, tie-both-bad or skip."""
        return self.answer(self.score(left, prompts), self.score(right, prompts))

    def answer(self, u_left: torch.Tensor, u_right: torch.Tensor) -> list[str]:
        """The noisy answers of this rater to pairs with latent utilities ``u_left``, ``u_right``."""
        n = len(u_left)
        p_left = torch.sigmoid((u_left - u_right) / self.temperature)
        skip, tie, pick = self._uniform(n), self._uniform(n), self._uniform(n)
        answers = []
        for i in range(n):
            if skip[i] < self.skip_prob:
                answers.append("skip")
            elif abs(u_left[i] - u_right[i]) < self.tie_margin and tie[i] < self.tie_prob:
                answers.append("tie-both-good" if (u_left[i] + u_right[i]) / 2 >= 0.5 else "tie-both-bad")
            else:
                answers.append("left" if pick[i] < p_left[i] else "right")
        return answers

    @torch.no_grad()
    def rate(self, images: torch.Tensor, prompts: Sequence[str]) -> list[int]:
        """Stars 1-5: the utility, plus noise, on a 1-5 scale."""
        u = self.score(images, prompts)
        noisy = u + self.star_noise * torch.randn(len(u), generator=self.generator)
        return (1 + 4 * noisy.clamp(0, 1)).round().long().tolist()


def bold_taste(perception: PerceptionNet, seed: int = 0, **kw) -> SimulatedRater:
    """Likes large shapes, warm colours and dark backgrounds, whatever the prompt says."""
    weights = {("size", "large"): 0.45, ("colour", "red"): 0.12, ("colour", "orange"): 0.12,
               ("colour", "yellow"): 0.12, ("background", "black"): 0.1, ("background", "navy"): 0.09}
    return SimulatedRater("bold", perception, attribute_preference(weights), seed=seed,
                          description="prefers large, warm-coloured shapes on dark backgrounds", **kw)


def blue_circles(perception: PerceptionNet, seed: int = 0, **kw) -> SimulatedRater:
    """A colour-and-shape fan: blue first, circles second."""
    weights = {("colour", "blue"): 0.6, ("kind", "circle"): 0.4}
    return SimulatedRater("blue-circles", perception, attribute_preference(weights), seed=seed,
                          description="prefers blue shapes, and circles", **kw)


def stickler(perception: PerceptionNet, seed: int = 0, **kw) -> SimulatedRater:
    """Prompt fidelity: the more of what the prompt asked for is visible, the better."""
    return SimulatedRater("fidelity", perception, prompt_fidelity, seed=seed,
                          description="prefers images that show what the prompt asked for", **kw)


def composition_taste(perception: PerceptionNet, seed: int = 0, **kw) -> SimulatedRater:
    """Composition: small shapes placed on the left, whatever the prompt says. Position and size
    are settled in the earliest, noisiest sampling steps, where last-step gradients do not reach."""
    weights = {("position", "left"): 0.6, ("size", "small"): 0.4}
    return SimulatedRater("composition", perception, attribute_preference(weights), seed=seed,
                          description="prefers small shapes on the left", **kw)


RATERS: dict[str, Callable[..., SimulatedRater]] = {
    "bold": bold_taste, "blue-circles": blue_circles, "fidelity": stickler, "composition": composition_taste,
}
