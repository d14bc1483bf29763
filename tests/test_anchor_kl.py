"""Prior preservation: the KL to the round's parent on the model's anchor prompts (``anchor_kl``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.errors import AppError
from app.round_config import RoundConfig
from bench.loop import HELD_OUT
from rlr_core import rewards
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.estimators.kl import anchor_kl_backward, kl_to_reference
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.perception import PerceptionNet
from rlr_core.training import EstimatorConfig, TrainConfig, lora, run_round

FAST = SamplerSettings(steps=4, eta=1.0, guidance=1.0)


def _matches(scene: sw.PartialScene, other: sw.PartialScene) -> bool:
    return all(getattr(scene, k) == v for k, v in other.specified().items())


def test_anchor_prompts_name_every_attribute_and_none_is_a_prompt_fidelity_is_judged_on() -> None:
    anchors = [sw.parse_caption(p) for p in BuiltinBackend.anchor_prompts]
    assert len(set(BuiltinBackend.anchor_prompts)) == len(anchors) >= 8
    assert all(set(a.specified()) == set(sw.ATTRIBUTES) for a in anchors)  # nothing left for a taste to change
    # the guard's held-out probes and the loop benchmark's held-out prompts stay unseen by training
    judged = [sw.parse_caption(p) for p in (*BuiltinBackend.held_out_prompts, *HELD_OUT)]
    assert not [(a, j) for a in anchors for j in judged if _matches(a, j)]
    sizes = [a.size for a in anchors]
    assert sizes.count("small") == sizes.count("large")  # no size favoured


def _adapted_backend() -> tuple[BuiltinBackend, BackendChain]:
    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    lora.add_lora(backend, rank=2, seed=0)
    chain = BackendChain(backend, rewards.make_reward("fidelity", PerceptionNet().eval().requires_grad_(False)), FAST)
    return backend, chain


def _move_adapter(backend: BuiltinBackend, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


def test_anchor_kl_is_zero_at_the_parent_and_its_gradient_is_the_closed_forms() -> None:
    backend, chain = _adapted_backend()
    _move_adapter(backend, 0.01, seed=1)  # the parent: an adapter already off the base
    chain.set_reference()
    ctx = chain.context(list(BuiltinBackend.anchor_prompts[:3]))
    params = chain.parameters()
    assert anchor_kl_backward(chain, ctx, 2.0, torch.Generator().manual_seed(0), steps=None) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in params)

    _move_adapter(backend, 0.01, seed=2)  # the round moved it
    for p in params:
        p.grad = None
    kl = anchor_kl_backward(chain, ctx, 2.0, torch.Generator().manual_seed(0), steps=None)
    # the same chains, sampled from the same generator state, through the closed form
    traj = chain.rollout(ctx, torch.Generator().manual_seed(0))
    closed = kl_to_reference(chain, ctx, traj).mean()
    assert kl == pytest.approx(float(closed.detach()), rel=1e-5) and kl > 0
    want = torch.autograd.grad(2.0 * closed, params)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w)
    assert anchor_kl_backward(chain, ctx, 0.0, torch.Generator().manual_seed(0)) == 0.0  # off


def _anchor_change(backend: BuiltinBackend) -> float:
    """How far the trained adapter's steps are from the base model's on the anchor prompts."""
    chain = BackendChain(backend, lambda x0, ctx: x0.sum((1, 2, 3)), FAST)  # the reward is not used
    ctx = chain.context(list(BuiltinBackend.anchor_prompts))
    with torch.no_grad():
        traj = chain.rollout(ctx, torch.Generator().manual_seed(7))
        return float(kl_to_reference(chain, ctx, traj).mean())  # no reference set: the base model


def test_a_round_with_anchor_kl_changes_the_anchor_prompts_less(tmp_path: Path) -> None:
    """A reward that ignores the prompt (large red shapes) trained on two prompts: with a strong
    anchor KL the adapter moves the anchor prompts' steps less, and each step records the KL."""
    torch.manual_seed(1)
    reward_fn = rewards.make_reward("prefer-large+prefer-colour:red", PerceptionNet().eval().requires_grad_(False))
    changes, histories = {}, {}
    for coef in (0.0, 100.0):
        backend = BuiltinBackend(builtin_model.new_model(seed=0))
        config = TrainConfig(estimator=EstimatorConfig("truncated-bp", {"steps": 2}), steps=4, batch=4,
                             prompts=["a shape", "a circle"], sampler=FAST, lr=3e-2, seed=0, anchor_kl=coef)
        result = run_round(backend, reward_fn, config, tmp_path / f"v{coef}")
        changes[coef], histories[coef] = _anchor_change(backend), result.metrics["history"]
        assert TrainConfig.from_dict(config.to_dict()).anchor_kl == coef
    assert all("anchor_kl" not in row for row in histories[0.0])
    assert all(row["anchor_kl"] >= 0 for row in histories[100.0]) and histories[100.0][-1]["anchor_kl"] > 0
    assert changes[0.0] > 0 and changes[100.0] < 0.5 * changes[0.0]


def test_a_model_without_anchor_prompts_trains_as_before(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reward_fn = rewards.make_reward("prefer-large", PerceptionNet().eval().requires_grad_(False))
    rows = []
    for coef in (0.0, 5.0):
        backend = BuiltinBackend(builtin_model.new_model(seed=0))
        backend.anchor_prompts = ()
        config = TrainConfig(estimator=EstimatorConfig("truncated-bp", {"steps": 1}), steps=1, batch=2,
                             prompts=["a circle"], sampler=FAST, lr=1e-2, seed=0, anchor_kl=coef)
        rows.append(run_round(backend, reward_fn, config, tmp_path / f"w{coef}").metrics["history"][0])
    assert "anchor_kl" not in rows[1]
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"] and rows[0]["grad_norm"] == rows[1]["grad_norm"]


def test_anchor_kl_is_a_checked_round_setting() -> None:
    config = RoundConfig.parse({"anchor_kl": 2.5})
    assert config.training.anchor_kl == 2.5 and config.public()["anchor_kl"] == 2.5
    assert config.for_round(["a circle"], None, 3, (0.4, 0.75), None).anchor_kl == 2.5
    assert RoundConfig.parse({}).training.anchor_kl == RoundConfig.parse({}).public()["anchor_kl"]
    for bad in (-1, "lots", 1e9, [1]):
        with pytest.raises(AppError, match="anchor KL"):
            RoundConfig.parse({"anchor_kl": bad})


def test_the_command_line_takes_anchor_kl_with_the_models_default() -> None:
    from rlr_core.training import cli
    from rlr_core.training.defaults import defaults_for

    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    given = cli.train_config(cli.parse_args(["--out", "v", "--anchor-kl", "2"]), defaults_for(backend))
    assert given.anchor_kl == 2.0
    left_out = cli.train_config(cli.parse_args(["--out", "v"]), defaults_for(backend))
    assert left_out.anchor_kl == defaults_for(backend)["anchor_kl"]
