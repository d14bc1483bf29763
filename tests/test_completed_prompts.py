"""Completed prompts and the fidelity term that counts what a prompt names.

A round trains on some of its prompts with what they leave open named at random
(``completed_share``), so the fidelity term guards what prompts can ask for; the term weighs each
thing a prompt names at w, however many others it names."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from app.errors import AppError
from app.round_config import RoundConfig
from rlr_core.shapesworld import clips
from rlr_core.shapesworld import world as sw
from rlr_core.training.round import _batch_prompts


def test_a_completed_prompt_keeps_what_it_names_and_names_the_rest(builtin_backend):
    rng = random.Random(0)
    for prompt in ["a circle", "a shape on the left", "a small shape", "a Blue  square, white background"]:
        named = sw.parse_caption(builtin_backend.check_prompt(prompt)).specified()
        for _ in range(20):
            completed = builtin_backend.complete_prompt(prompt, rng)
            scene = sw.parse_caption(completed).specified()
            assert set(scene) == set(sw.ATTRIBUTES), completed  # everything named
            assert {k: scene[k] for k in named} == named, completed  # what the prompt asked, kept
            assert (scene["colour"], scene["kind"]) not in sw.HELD_OUT_PAIRS  # never a pair it was not shown
            builtin_backend.check_prompt(completed)


def test_a_held_out_pair_the_prompt_names_itself_is_kept(builtin_backend):
    colour, kind = next(iter(sw.HELD_OUT_PAIRS))
    completed = builtin_backend.complete_prompt(f"a {colour} {kind}", random.Random(1))
    scene = sw.parse_caption(completed)
    assert (scene.colour, scene.kind) == (colour, kind)


def test_the_clip_model_completes_its_own_grammar():
    from rlr_core.backends.loading import load_backend
    from tests.clip_model import clip_model_dir

    backend = load_backend(clip_model_dir())
    assert backend.completes_prompts
    completed = backend.complete_prompt("a red circle moving left", random.Random(0))
    scene = clips.parse_clip_caption(completed).specified()
    assert set(scene) == set(clips.CLIP_ATTRIBUTES)
    assert (scene["colour"], scene["kind"], scene["direction"]) == ("red", "circle", "left")


def test_a_model_without_a_grammar_completes_nothing():
    from rlr_core.backends.latent import DiffusersLatentBackend
    from tests.tiny_sd import tiny_pipeline

    backend = DiffusersLatentBackend.from_pipeline(tiny_pipeline(), name="tiny-sd")
    assert not backend.completes_prompts
    assert backend.complete_prompt("a red apple on a table", random.Random(0)) is None


def test_a_batch_completes_its_share_and_keeps_prompts_a_model_cannot_complete():
    prompts = ["a circle", "a square"]
    complete = lambda p, rng: p + f" {rng.choice(['on the left', 'on the right'])}"
    batch = _batch_prompts(random.Random(3), prompts, 6, 0.33, complete)
    assert [p in prompts for p in batch] == [True] * 4 + [False] * 2  # round(0.33 * 6) = 2, drawn last
    assert all(p.split(" on the ")[0] in prompts for p in batch[4:])
    assert _batch_prompts(random.Random(3), prompts, 6, 0.33, complete) == batch  # the round's seed decides
    assert all(p in prompts for p in _batch_prompts(random.Random(3), prompts, 6, 0.33, lambda p, rng: None))
    assert _batch_prompts(random.Random(3), prompts, 6) == _batch_prompts(random.Random(3), prompts, 6, 0.5, None)
    assert all(p not in prompts for p in _batch_prompts(random.Random(3), prompts, 4, 1.0, complete))


def test_the_share_is_a_checked_round_setting():
    assert RoundConfig.parse({"completed_share": 0.5}).training.completed_share == 0.5
    assert RoundConfig.parse({"completed_share": 0.5}).public()["completed_share"] == 0.5
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(AppError, match="completed prompts share"):
            RoundConfig.parse({"completed_share": bad})


def test_the_fidelity_term_counts_each_thing_a_prompt_names():
    from app.training_job import ProxyReward
    from rlr_core.feedback.encoders import PerceptionImageEncoder
    from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
    from rlr_core.feedback.reward_proxy import RewardProxy
    from rlr_core.fidelity import shapes_judge

    torch.manual_seed(0)
    judge = shapes_judge()
    proxy = RewardProxy(PerceptionImageEncoder(), BagOfWordsPromptEncoder())
    prompts = ["a circle", "a small red circle on the left, white background"]
    scene = sw.Scene("circle", "red", "small", "left", "white")
    x = torch.from_numpy(np.stack([sw.render(scene, np.random.default_rng(i)) for i in range(2)])).permute(0, 3, 1, 2)
    assert judge.named(prompts).tolist() == [1.0, 5.0]
    reward = ProxyReward(proxy, penalty=0.0, judge=judge, fidelity_weight=2.0)
    got = reward(x, prompts).detach()
    proxy_only = proxy.head_rewards(x, prompts).detach().mean(0)
    fidelity = judge.score(x, prompts).detach()
    assert fidelity.min() > 0.9  # the render shows what both prompts ask
    assert torch.allclose(got, proxy_only + 2.0 * fidelity * torch.tensor([1.0, 5.0]), atol=1e-5)
    observed = reward.observe()
    assert reward.proxy_reward(float(got.mean()), observed) == pytest.approx(float(proxy_only.mean()), abs=1e-5)
