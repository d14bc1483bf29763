"""Composition rewards, the pixel judge, and the race's checks and arm resolution (fixed seeds)."""

import argparse
import random

import numpy as np
import pytest
import torch

from bench import race, race_report
from rlr_core import rewards
from rlr_core.shapesworld import perception, pixel_judge
from rlr_core.shapesworld import world as sw


def renders(n: int, seed: int, **fixed: str) -> tuple[torch.Tensor, list[sw.Scene]]:
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    scenes = [sw.PartialScene(**fixed).complete(pyrng) for _ in range(n)]
    images = torch.from_numpy(np.stack([sw.render(s, rng) for s in scenes])).permute(0, 3, 1, 2)
    return images, scenes


@pytest.mark.parametrize("name,attribute,value", [("prefer-small", "size", "small"), ("prefer-large", "size", "large"),
                                                  ("prefer-left", "position", "left"),
                                                  ("prefer-center", "position", "center"),
                                                  ("prefer-right", "position", "right")])
def test_composition_rewards_prefer_their_value_and_are_differentiable(name, attribute, value):
    judge = perception.load()
    reward = rewards.make_reward(name, judge)
    assert rewards.targeted_attributes(reward) == {attribute}
    assert rewards.COMPOSITION[name] == (attribute, value)
    good, _ = renders(16, 1, **{attribute: value})
    other = next(v for v in sw.ATTRIBUTES[attribute] if v != value)
    bad, _ = renders(16, 1, **{attribute: other})
    prompts = ["a shape"] * 16
    assert float(reward(good, prompts).mean()) > float(reward(bad, prompts).mean()) + 1.0
    x = bad.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_pixel_judge_reads_fresh_renders():
    images, scenes = renders(300, 7)
    readings = pixel_judge.read(images)
    for attribute in ("size", "position", "background"):
        accuracy = np.mean([r.value(attribute) == getattr(s, attribute) for r, s in zip(readings, scenes)])
        assert accuracy >= 0.98, (attribute, accuracy)
    small = [r.area for r, s in zip(readings, scenes) if s.size == "small"]
    large = [r.area for r, s in zip(readings, scenes) if s.size == "large"]
    assert max(small) < min(large)
    assert pixel_judge.agreement(readings, "size", "small") == pytest.approx(
        np.mean([s.size == "small" for s in scenes]), abs=0.02)


def test_pixel_judge_sees_no_shape_on_a_flat_image():
    flat = torch.full((1, 3, 32, 32), 0.5)
    reading = pixel_judge.read(flat)[0]
    assert reading.size is None and reading.position is None and reading.background == "gray"
    assert pixel_judge.agreement([reading], "size", "small") == 0.0  # erasing the shape is no success
    speck = flat.clone()
    speck[:, :, 15:18, 15:18] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    assert pixel_judge.read(speck)[0].size is None  # nor is shrinking it to a dot
    assert pixel_judge.read(speck)[0].area == 9


def test_quality_falls_with_noise_and_blur():
    images, scenes = renders(24, 3)
    prompts = [sw.caption(s) for s in scenes]
    clean = pixel_judge.quality(images, prompts)["quality"]
    assert float(clean.mean()) > 0.85
    gen = torch.Generator().manual_seed(0)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    q_noisy = pixel_judge.quality(noisy, prompts)
    assert float(q_noisy["noise"].mean()) > 3 * float(pixel_judge.quality(images, prompts)["noise"].mean())
    assert float(q_noisy["quality"].mean()) < float(clean.mean()) - 0.3
    assert float(pixel_judge.quality(blurred, prompts)["sharpness"].mean()) < 0.8


def curve(pixels: list[float], fidelity: list[float] | None = None, batch: int = 4, secs: float = 1.0) -> list[dict]:
    fidelity = fidelity or [0.9] * len(pixels)
    return [{"step": i, "samples": i * batch, "train_seconds": i * secs, "train_reward": None, "eval_reward": p,
             "pixel": p, "fidelity": f, "quality": 0.8} for i, (p, f) in enumerate(zip(pixels, fidelity))]


def test_race_targets_pass_and_fail_on_the_right_curves():
    fast = [curve([0.2, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])] * 5
    ddpo = [curve([0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.6], secs=0.5)] * 5
    slow = [curve([0.2, 0.2, 0.3, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75])] * 5
    kl_ok = [curve([0.2, 0.4, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6], [0.9] * 8 + [0.88])] * 5
    got = race_report.targets({"rlr": fast, "truncated-bp": slow, "ddpo": ddpo, "rlr-kl": kl_ok, "rlr-dcot": slow},
                              {})
    assert [c["met"] for c in got] == [True, True, True, True, False, False]  # DCoT: the same count is not fewer
    got = race_report.targets({"rlr": slow, "truncated-bp": fast, "ddpo": ddpo, "rlr-dcot": fast}, {"rlr-kl": "why"})
    assert [c["met"] for c in got] == [False, False, False, False, True, True]
    assert "why" in got[3]["value"]
    # a DCoT arm that only starts higher (stage prompts) and learns no faster passes on levels, not on gains
    shifted = [curve([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.75, 0.75, 0.75])] * 5
    got = race_report.targets({"rlr": slow, "truncated-bp": fast, "ddpo": ddpo, "rlr-dcot": shifted}, {})
    assert [c["met"] for c in got[-2:]] == [True, False]


def test_arms_that_cannot_run_are_skipped_with_the_reason():
    args = argparse.Namespace(kl_coef=0.1, steps=10, inner_epochs=4)
    plan = race.resolve("rlr-dcot", args)
    assert plan[0] == "rlr" and plan[1]["window"] == (8, 10) and plan[2] is True
    race.ARMS["bogus"] = ("rlr", {"no_such_option": 1}, False)
    try:
        assert "no_such_option" in race.resolve("bogus", args)
    finally:
        del race.ARMS["bogus"]
