import random

import numpy as np
import torch

from rlr_core.shapesworld import perception
from rlr_core.shapesworld import world as sw


def test_perception_reads_fresh_renders_at_99_percent():
    model = perception.load()
    accuracy = perception.accuracy(model, n=1000, seed=777)  # a seed training never used
    assert min(accuracy.values()) >= 0.99, accuracy


def test_perception_reads_held_out_pairs():
    model = perception.load()
    rng = np.random.default_rng(5)
    scenes = [s for s in sw.all_scenes() if s.held_out]
    images = torch.from_numpy(np.stack([sw.render(s, rng) for s in scenes])).permute(0, 3, 1, 2)
    predicted = model.predict(images)
    correct = sum(p == s.as_dict() for p, s in zip(predicted, scenes))
    assert correct / len(scenes) >= 0.97


def test_embedding_is_differentiable_in_the_image():
    model = perception.load()
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    emb = model.embed(images)
    assert emb.shape == (2, perception.EMBED_DIM)
    score = model.log_prob_of(images, [sw.PartialScene(colour="red"), sw.PartialScene(kind="circle")])
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen


def test_log_prob_prefers_the_matching_prompt():
    model = perception.load()
    rng = np.random.default_rng(0)
    scene = sw.PartialScene().complete(random.Random(0))
    image = torch.from_numpy(sw.render(scene, rng)).permute(2, 0, 1)[None]
    right = sw.PartialScene(**scene.as_dict())
    wrong_colour = [c for c in sw.COLOURS if c != scene.colour][0]
    wrong = sw.PartialScene(**{**scene.as_dict(), "colour": wrong_colour})
    lp = model.log_prob_of(image.repeat(2, 1, 1, 1), [right, wrong])
    assert lp[0] > lp[1] + 3
