"""The estimators on the real built-in UNet (random init, LoRA): plumbing identities that must
hold exactly on any model. Unbiasedness itself is tested on the toy chain, with the same code."""

from __future__ import annotations

import pytest
import torch

from rlr_core import rewards
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.estimators import DDPO, RLR, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.estimators.chain import ZOPerturbation
from rlr_core.estimators.memory import auto_block_size, measure_step_memory
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld.perception import PerceptionNet
from rlr_core.training import lora

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def chain() -> BackendChain:
    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    torch.manual_seed(1)
    perception = PerceptionNet().eval().requires_grad_(False)
    lora.add_lora(backend, rank=2, seed=0)
    with torch.no_grad():  # a non-zero B so that every LoRA weight gets a gradient
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return BackendChain(backend, rewards.make_reward("fidelity", perception), SamplerSettings(3, 1.0, 1.0))


def grad_of(chain: BackendChain, est, seed: int = 0) -> torch.Tensor:
    for p in chain.parameters():
        p.grad = None
    est.accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(seed))
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in chain.parameters()])


def assert_same_direction(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-3) -> None:
    # Float32 rounding differs with the batch composition of the UNet calls: compare by norm.
    assert float((got - want).norm()) <= rel * float(want.norm())


def test_lora_only_is_trained(chain: BackendChain) -> None:
    names = [n for n, _ in chain.named_parameters()]
    assert names and all("lora_" in n for n in names)


def test_pathwise_estimators_agree_where_they_must(chain: BackendChain) -> None:
    full = grad_of(chain, FullBackprop())
    assert full.norm() > 0
    torch.testing.assert_close(grad_of(chain, FullBackprop(use_checkpoint=False)), full)
    torch.testing.assert_close(grad_of(chain, TruncatedBackprop(steps=3)), full)
    torch.testing.assert_close(grad_of(chain, RLR(tail=3)), full)  # FO tail = whole chain


def test_ddpo_first_step_is_lr_and_chunking_does_not_matter(chain: BackendChain) -> None:
    lr = grad_of(chain, LikelihoodRatio(chunk=16))
    assert lr.norm() > 0
    assert_same_direction(grad_of(chain, LikelihoodRatio(chunk=1)), lr)
    assert_same_direction(grad_of(chain, DDPO(chunk=3)), lr)


@pytest.mark.parametrize("settings", [
    {"rest": "lr"}, {"rest": "lr", "rest_steps": 1}, {"rest": "zo"}, {"rest": "none"},
    {"block": 1, "block_start": "grad-norm"}, {"block": "auto", "memory_budget_gb": 0.5},
])
def test_rlr_variants_run(chain: BackendChain, settings: dict) -> None:
    g = grad_of(chain, RLR(**settings))
    assert torch.isfinite(g).all() and g.norm() > 0


def test_zo_perturbation_is_exact_and_restored(chain: BackendChain) -> None:
    ctx = chain.context(PROMPTS)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in chain.parameters()]
    active = torch.zeros(4, 2, dtype=torch.bool)
    active[3, 1] = True  # only row 1 perturbed, at step 3
    pert = ZOPerturbation(chain, active, scale=0.05, seed=11)
    deltas = pert.deltas(3)
    assert all(float(d[0].abs().sum()) == 0 for d in deltas)
    torch.testing.assert_close(deltas[0], pert.deltas(3)[0])  # replayable from the seed
    with torch.no_grad():
        plain = chain.mean(x, 3, ctx)
        perturbed = chain.perturbed_mean(x, 3, ctx, deltas)
    for p, b in zip(chain.parameters(), before):
        assert torch.equal(p, b)
    torch.testing.assert_close(perturbed[0], plain[0])
    assert not torch.allclose(perturbed[1], plain[1])


def test_auto_block_size_from_measured_memory(chain: BackendChain) -> None:
    b_h, b_z = measure_step_memory(chain, chain.context(PROMPTS), zo=True)
    assert b_h > b_z > 0
    assert auto_block_size(b_z * 2 + 2 * (b_h - b_z), 3, 1, b_h, b_z) == 2
    assert auto_block_size(0, 3, 1, b_h, b_z) == 1
    assert auto_block_size(10**15, 3, 1, b_h, b_z) == 2  # at most K - L


def test_block_window_is_respected(chain: BackendChain) -> None:
    est = RLR(block=1, window=(3, 3))
    estimate = est.accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(0))
    assert estimate.stats["block_start_mean"] == 3
    with pytest.raises(ValueError, match="no block start"):
        RLR(block=2, window=(1, 1)).accumulate(chain, chain.context(PROMPTS), torch.Generator())
