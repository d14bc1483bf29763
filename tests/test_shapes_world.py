import random

import numpy as np
import pytest

from rlr_core.shapesworld import world as sw


def test_render_shape_range_and_jitter():
    scene = sw.Scene("circle", "red", "large", "center", "white")
    rng = np.random.default_rng(0)
    a, b = sw.render(scene, rng), sw.render(scene, rng)
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.abs(a - b).mean() > 1e-3, "two renders of one caption must differ (jitter)"


def test_render_puts_the_shape_where_the_caption_says():
    rng = np.random.default_rng(1)
    for position, expected_x in [("left", 9), ("center", 16), ("right", 23)]:
        image = sw.render(sw.Scene("square", "red", "small", position, "black"), rng)
        redness = image[..., 0] - image[..., 1]  # red shape on a black background
        xs = np.nonzero(redness.max(axis=0) > 0.5)[0]
        assert abs(xs.mean() - expected_x) <= 2.5


def test_large_shapes_cover_more_pixels_than_small():
    rng = np.random.default_rng(2)
    for kind in sw.KINDS:
        area = {}
        for size in sw.SIZES:
            image = sw.render(sw.Scene(kind, "yellow", size, "center", "navy"), rng)
            area[size] = (image[..., 0] > 0.5).sum()
        assert area["large"] > 2 * area["small"], kind


def test_colours_and_backgrounds_render_as_named():
    rng = np.random.default_rng(3)
    for colour, rgb in sw.COLOURS.items():
        image = sw.render(sw.Scene("circle", colour, "large", "center", "gray"), rng)
        assert np.abs(image[16, 16] - np.array(rgb)).max() < 0.15
        assert np.abs(image[1, 1] - np.array(sw.BACKGROUNDS["gray"])).max() < 0.1


def test_caption_grammar_round_trips():
    for scene in random.Random(0).sample(sw.all_scenes(), 50):
        assert sw.parse_caption(sw.caption(scene)) == sw.PartialScene(**scene.as_dict())
    assert sw.caption(sw.PartialScene(colour="red", kind="circle")) == "a red circle"
    assert sw.parse_caption("a red circle").specified() == {"colour": "red", "kind": "circle"}


def test_training_data_never_contains_held_out_pairs():
    stream = sw.training_examples(seed=0)
    scenes = [next(stream)[2] for _ in range(500)]
    assert not any(s.held_out for s in scenes)
    # ...but every other colour/kind pair appears
    pairs = {(s.colour, s.kind) for s in scenes}
    assert len(pairs) == len(sw.COLOURS) * len(sw.KINDS) - len(sw.HELD_OUT_PAIRS)


def test_training_captions_omit_attributes_sometimes():
    stream = sw.training_examples(seed=1, drop_prob=0.3)
    captions = [next(stream)[1] for _ in range(200)]
    assert any("background" not in c for c in captions)
    assert any(c.startswith("a shape") for c in captions)
    assert sum("background" in c for c in captions) > 100


def test_complete_respects_specified_attributes():
    partial = sw.PartialScene(colour="green", position="left")
    rng = random.Random(0)
    for _ in range(20):
        scene = partial.complete(rng, allow_held_out=False)
        assert scene.colour == "green" and scene.position == "left"
        assert scene.kind != "triangle"  # green triangle is held out
    with pytest.raises(ValueError):
        sw.PartialScene(colour="green", kind="triangle").complete(rng, allow_held_out=False)


def test_drop_overrides_keep_one_attribute_while_others_drop():
    stream = sw.training_examples(seed=2, drop_prob=0.5, drop_overrides={"position": 0.0})
    captions = [next(stream)[1] for _ in range(100)]
    assert all(any(p in c for p in ("left", "center", "right")) for c in captions)
    assert sum("background" in c for c in captions) < 80  # the others still drop at 0.5


def test_fixed_attributes_pin_every_scene_of_a_curriculum_stage():
    stream = sw.training_examples(seed=3, fixed={"background": "black", "size": "large"})
    scenes = [next(stream)[2] for _ in range(50)]
    assert all(s.background == "black" and s.size == "large" for s in scenes)
    assert len({s.colour for s in scenes}) > 3  # the rest still vary
