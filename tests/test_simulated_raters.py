"""Simulated raters: their tastes (read through the trained perception model) and their noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlr_core.shapesworld import perception
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.raters import RATERS, SimulatedRater, attribute_preference, bold_taste, stickler


@pytest.fixture(scope="module")
def model():
    if not (perception.DEFAULT_PERCEPTION_DIR / "model.safetensors").exists():
        pytest.skip("needs the trained perception model (models/perception)")
    return perception.load()


def renders(scenes: list[sw.Scene], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([sw.render(s, rng) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def random_scenes(n: int, seed: int) -> list[sw.Scene]:
    import random

    rng = random.Random(seed)
    return [sw.PartialScene().complete(rng) for _ in range(n)]


def test_bold_rater_prefers_large_shapes(model):
    scenes = random_scenes(40, 0)
    large = [sw.Scene(**{**s.as_dict(), "size": "large"}) for s in scenes]
    small = [sw.Scene(**{**s.as_dict(), "size": "small"}) for s in scenes]
    rater = bold_taste(model, seed=0)
    prompts = [sw.caption(sw.PartialScene(kind=s.kind)) for s in scenes]
    x_large, x_small = renders(large, 1), renders(small, 2)
    with torch.no_grad():
        du = rater.score(x_large, prompts) - rater.score(x_small, prompts)
    assert (du > 0.3).float().mean() >= 0.95  # size carries 0.45 of this rater's utility
    answers = rater.compare(x_large, x_small, prompts)
    assert answers.count("left") / len(answers) >= 0.85  # BT at T=0.1 on du~0.45, minus skips


def test_fidelity_rater_prefers_what_the_prompt_asked_for(model):
    scenes = random_scenes(40, 3)
    wrong = [sw.Scene(**{**s.as_dict(), "colour": sw.ATTRIBUTES["colour"][
        (sw.ATTRIBUTES["colour"].index(s.colour) + 1) % 6]}) for s in scenes]
    prompts = [sw.caption(sw.PartialScene(colour=s.colour, kind=s.kind)) for s in scenes]
    rater = stickler(model)
    with torch.no_grad():
        good, bad = rater.score(renders(scenes, 4), prompts), rater.score(renders(wrong, 5), prompts)
    assert ((good - bad) > 0.4).float().mean() >= 0.95  # one of two asked-for attributes is wrong
    assert good.min() >= 0 and good.max() <= 1


def test_answer_noise_rates_and_determinism():
    rater = SimulatedRater("t", perception.PerceptionNet(), lambda probs, scenes: probs["kind"][:, 0],
                           temperature=0.1, tie_margin=0.05, tie_prob=0.5, skip_prob=0.05, seed=7)
    n = 4000
    u = torch.full((n,), 0.7)
    near = rater.answer(u, u + 0.01)  # within the tie margin, mean >= 0.5
    assert abs(near.count("skip") / n - 0.05) < 0.015  # binomial sd 0.0034
    assert abs(near.count("tie-both-good") / n - 0.95 * 0.5) < 0.04
    assert near.count("tie-both-bad") == 0
    far = rater.answer(torch.full((n,), 0.3), torch.full((n,), 0.1))  # P(left) = sigmoid(2) = 0.881
    decided = [a for a in far if a in ("left", "right")]
    assert abs(decided.count("left") / len(decided) - 0.881) < 0.03
    low = rater.answer(torch.full((n,), 0.1), torch.full((n,), 0.12))
    assert "tie-both-bad" in low and "tie-both-good" not in low
    again = SimulatedRater("t", rater.perception, rater.utility, temperature=0.1, tie_margin=0.05,
                           tie_prob=0.5, skip_prob=0.05, seed=7)
    assert again.answer(u, u + 0.01) == near


def test_stars_follow_utility_and_score_is_differentiable(model):
    scenes = random_scenes(24, 6)
    rater = RATERS["blue-circles"](model, seed=1)
    prompts = ["a shape"] * len(scenes)
    x = renders(scenes, 7).requires_grad_(True)
    u = rater.score(x, prompts)
    u.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    stars = torch.tensor(rater.rate(x.detach(), prompts), dtype=torch.float32)
    assert stars.min() >= 1 and stars.max() <= 5
    assert torch.corrcoef(torch.stack([stars, u.detach()]))[0, 1] > 0.8


def test_attribute_preference_rejects_unknown_values():
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_preference({("colour", "teal"): 1.0})
