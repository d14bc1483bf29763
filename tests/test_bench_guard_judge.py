"""bench/guard_judge.py's readings: judges agree on fresh renders; disagreement is counted the right way round."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from app.fidelity_guard import paired_drop
from bench.guard_judge import attribute_disagreement, read_images
from rlr_core.fidelity import ShapesFidelity
from rlr_core.shapesworld import world as sw


def test_the_guard_and_the_pixels_both_read_fresh_renders_as_faithful():
    scenes = random.Random(0).sample(sw.all_scenes(include_held_out=False), 24)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([sw.render(s, rng) for s in scenes])).permute(0, 3, 1, 2)
    prompts = [sw.caption(s) for s in scenes]
    read = read_images(images, prompts, {"guard": ShapesFidelity()})
    assert read["fidelity"]["pixel"] == [1.0] * 24
    assert read["fidelity"]["guard"] == [1.0] * 24
    # a blank image shows no shape: the pixels read the shape's attributes as wrong
    blank = read_images(torch.zeros(1, 3, 32, 32), ["a large red circle on the left, white background"],
                        {"guard": ShapesFidelity()})
    assert blank["right"]["pixel"][0]["size"] is False and blank["right"]["pixel"][0]["background"] is False
    # both find no shape on it (the guard's judge by its presence model); on the renders, a shape every time
    assert blank["no_shape"] == {"pixel": [True], "guard": [True]}
    assert read["no_shape"] == {"pixel": [False] * 24, "guard": [False] * 24}


def test_lenient_and_strict_are_counted_against_the_pixels():
    right = {"pixel": [{"size": False}, {"size": True}, {"size": True}, {"size": False}],
             "guard": [{"size": True}, {"size": False}, {"size": True}, {"size": False}]}
    assert attribute_disagreement(right, "guard") == {"size": {"n": 4, "lenient": 0.25, "strict": 0.25}}


def test_the_drop_is_paired_image_by_image():
    drop, se = paired_drop(dict(enumerate([1.0, 0.5, 1.0, 0.5])), dict(enumerate([0.5, 0.5, 0.5, 0.5])))
    assert drop == 0.25 and abs(se - 0.5773502 * 0.5 / 2) < 1e-6


def test_the_flag_rate_counts_subsamples_past_the_threshold():
    from bench.guard_judge import flag_rate

    base = [1.0] * 8  # 2 prompts x 4 images
    assert flag_rate(base, [1.0] * 8, 4, 2, random.Random(0)) == 0.0  # no drop: never flagged
    assert flag_rate(base, [0.5] * 8, 4, 2, random.Random(0)) == 1.0  # a drop of 0.5 everywhere: always
    one_bad = [1.0] * 7 + [0.0]  # one image of 8 lost: flagged when the subsample holds it
    assert flag_rate(base, one_bad, 4, 2, random.Random(0)) == pytest.approx(0.5, abs=0.05)
