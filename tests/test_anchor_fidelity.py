"""Prior preservation by reward: anchor rows in each training batch, rewarded by fidelity alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.errors import AppError
from app.round_config import ANCHOR_ROWS, RoundConfig
from app.training_job import ProxyReward
from rlr_core import fidelity
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.feedback.encoders import PerceptionImageEncoder
from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
from rlr_core.feedback.reward_proxy import RewardProxy
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import model as builtin_model
from rlr_core.training import EstimatorConfig, TrainConfig, anchor_pool, run_round

FAST = SamplerSettings(steps=4, eta=1.0, guidance=1.0)


@torch.no_grad()  # the values, not their graph
def test_anchor_rows_are_rewarded_by_fidelity_alone_and_left_out_of_the_plotted_taste() -> None:
    torch.manual_seed(0)
    judge = fidelity.shapes_judge()
    anchor = BuiltinBackend.anchor_prompts[0]
    proxy = RewardProxy(PerceptionImageEncoder(), BagOfWordsPromptEncoder())
    with_anchors = ProxyReward(proxy, 0.5, judge, fidelity_weight=1.0, anchors=frozenset([anchor]),
                               anchor_weight=7.0)
    plain = ProxyReward(proxy, 0.5, judge, fidelity_weight=1.0)
    images, prompts = torch.rand(4, 3, 32, 32), ["a red circle", "a square", anchor, anchor]
    got, taste = with_anchors(images, prompts), plain(images, prompts)
    scores = judge.score(images, prompts)
    assert torch.allclose(got[:2], taste[:2]) and torch.allclose(got[2:], 7.0 * scores[2:])
    # the Train tab's curves are the taste rows': the proxy's reward read back from the round's mean
    seen, plain_seen = with_anchors.observe(), plain.observe()
    assert seen["uncertainty"] == pytest.approx(float(proxy.head_rewards(images, prompts).std(0)[:2].mean()))
    assert seen["fidelity"] == pytest.approx(float(scores[:2].mean()))
    assert with_anchors.proxy_reward(float(got.mean()), seen) == pytest.approx(
        float(proxy.head_rewards(images, prompts).mean(0)[:2].mean()), abs=1e-5)
    assert plain.proxy_reward(float(taste.mean()), plain_seen) == pytest.approx(
        float(proxy.head_rewards(images, prompts).mean(0).mean()), abs=1e-5)


def test_without_a_weight_or_a_judge_no_row_is_an_anchor() -> None:
    proxy = RewardProxy(PerceptionImageEncoder(), BagOfWordsPromptEncoder())
    anchor = BuiltinBackend.anchor_prompts[0]
    for reward in (ProxyReward(proxy, anchors=frozenset([anchor]), anchor_weight=5.0),
                   ProxyReward(proxy, judge=fidelity.shapes_judge(), anchors=frozenset([anchor]))):
        images = torch.rand(2, 3, 32, 32)
        prompts = [anchor, "a circle"]
        assert torch.allclose(reward(images, prompts), proxy.head_rewards(images, prompts).mean(0))


def test_a_round_draws_its_anchor_rows_from_the_anchor_prompts_it_does_not_train_on(tmp_path: Path) -> None:
    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    own = backend.anchor_prompts[0]
    seen: list[list[str]] = []

    def reward_fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        seen.append(list(prompts))
        return images.float().mean((1, 2, 3))

    config = TrainConfig(estimator=EstimatorConfig("truncated-bp", {"steps": 1}), steps=3, batch=2,
                         prompts=["a circle", own], sampler=FAST, lr=1e-2, seed=0, anchor_rows=2)
    run_round(backend, reward_fn, config, tmp_path / "v")
    pool = anchor_pool(backend, config)
    assert own not in pool and set(pool) == set(backend.anchor_prompts) - {own}
    assert len(seen) == 3 and all(len(p) == 4 for p in seen)
    assert all(set(p[:2]) <= {"a circle", own} and set(p[2:]) <= set(pool) for p in seen)
    assert TrainConfig.from_dict(config.to_dict()).anchor_rows == 2
    backend.anchor_prompts = ()  # a model without anchor prompts trains on its batch alone
    seen.clear()
    run_round(backend, reward_fn, config, tmp_path / "w")
    assert all(len(p) == 2 for p in seen)


def test_anchor_fidelity_is_a_checked_round_setting() -> None:
    config = RoundConfig.parse({"anchor_fidelity": 4})
    assert config.anchor_fidelity == 4.0 and config.public()["anchor_fidelity"] == 4.0
    assert config.for_round(["a circle"], None, 3, (0.4, 0.75), None).anchor_rows == ANCHOR_ROWS
    assert RoundConfig.parse({}).training.anchor_rows == 0 and RoundConfig.parse({}).public()["anchor_fidelity"] == 0
    for bad in (-1, "lots", 1e9, [1]):
        with pytest.raises(AppError, match="anchor fidelity"):
            RoundConfig.parse({"anchor_fidelity": bad})
