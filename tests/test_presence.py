"""The presence model: a shape of the world's sizes is shown, a speck or an empty background is not."""

import random

import numpy as np
import torch

from rlr_core.shapesworld import perception, presence
from rlr_core.shapesworld import world as sw


def test_the_shipped_model_tells_shapes_from_specks_on_fresh_images():
    model = presence.load()
    accuracy = presence.accuracy(model, n=600, seed=777)  # a seed training never used
    assert min(accuracy.values()) >= 0.99, accuracy


def test_every_render_of_the_world_shows_a_shape():
    """The renderer's own shapes (every kind, size and position, held-out pairs too) read as shown."""
    model = presence.load()
    rng = np.random.default_rng(3)
    scenes = sw.all_scenes()[::3]
    images = torch.from_numpy(np.stack([sw.render(s, rng) for s in scenes])).permute(0, 3, 1, 2)
    assert float(model.probability(images).min()) >= 0.5


def test_a_speck_shrinking_reads_as_gone_below_the_worlds_sizes():
    """One shape shrunk step by step: shown at the world's sizes, not shown as a speck."""
    model = presence.load()
    scene = sw.PartialScene().complete(random.Random(1))
    rng = np.random.default_rng(1)
    half_extents = [8.5, 4.5, 4.0, 1.5, 0.8, 0.0]
    images = torch.from_numpy(np.stack([presence._image(rng, scene, r, 16.0, 16.0) for r in half_extents]))
    shown = (model.probability(images.permute(0, 3, 1, 2)) >= 0.5).tolist()
    assert shown == [True, True, True, False, False, False]


def test_training_starts_from_the_perception_encoder_and_round_trips(tmp_path):
    start = perception.load()
    model, losses = presence.train(steps=3, batch=8, start=start)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert not model.body.heads  # only the presence head is trained and saved
    perception.save(model, tmp_path, {"steps": 3})
    again = presence.load(tmp_path)
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again(images), model(images), atol=1e-6)
    assert all(not p.requires_grad for p in again.parameters())
