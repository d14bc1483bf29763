"""The estimators' variance-reduction options, the KL-to-base regulariser and the authors' preset,
on the linear-Gaussian toy chain against its closed-form gradient (the checks of
tests/test_estimators_analytic.py: unbiased within 4 SE on all 16 coordinates, fixed seeds), each
with a deliberately broken variant the same check must flag; plus the KL on the real UNet."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from rlr_core.estimators import DDPO, ESTIMATORS, RLR, AuthorsCode, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.kl import kl_to_reference, stochastic_steps
from rlr_core.estimators.toy_chain import ToyChain, ToyContext
from tests.test_estimators_analytic import BIG_CHUNK, bias_in_se, is_unbiased, summarise


@pytest.fixture(scope="module")
def chain() -> ToyChain:
    return ToyChain(dim=16, steps=20)


# --- the Taylor control variate (rlr_core/estimators/control_variate.py) ---------------------------

TAYLOR = {
    "lr-taylor-state": lambda: LikelihoodRatio(chunk=BIG_CHUNK, baseline="state", control_variate="taylor"),
    "rlr-taylor-state": lambda: RLR(chunk=BIG_CHUNK, baseline="state", control_variate="taylor"),
    "rlr-taylor-loo": lambda: RLR(chunk=BIG_CHUNK, baseline="loo", control_variate="taylor"),
    "rlr-taylor-subsampled-paper-tail": lambda: RLR(chunk=BIG_CHUNK, tail=1, rest_steps=4, control_variate="taylor"),
}


@pytest.mark.parametrize("name", list(TAYLOR))
def test_taylor_control_variate_is_unbiased(chain: ToyChain, name: str) -> None:
    s = summarise(chain, TAYLOR[name]())
    assert is_unbiased(s, chain.exact_grad()), f"{name}: max |bias| = {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_taylor_with_branches_is_unbiased(chain: ToyChain) -> None:
    # heavy-tailed terms: 120 batches, as the branching test uses
    s = summarise(chain, RLR(chunk=BIG_CHUNK, branches=4, control_variate="taylor"), batches=120)
    assert is_unbiased(s, chain.exact_grad()), f"max |bias| = {bias_in_se(s, chain.exact_grad()):.1f} SE"


def without_slopes(fn):
    """``fn`` called with ``slopes=None`` however its caller passed them (by name or position)."""
    signature = inspect.signature(fn)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["slopes"] = None
        return fn(*bound.args, **bound.kwargs)
    return call


def test_taylor_without_its_added_back_expectation_is_biased(chain: ToyChain, monkeypatch) -> None:
    """The broken variant: subtract the linear term from the advantages but forget to add back its
    expectation (d mu/d theta)^T a. The check must flag it."""
    from rlr_core.estimators import likelihood_ratio as lr_module
    from rlr_core.estimators import rlr as rlr_module

    for module in (lr_module, rlr_module):
        monkeypatch.setattr(module, "lr_backward", without_slopes(module.lr_backward))
    monkeypatch.setattr(RLR, "ho_backward", without_slopes(RLR.ho_backward))
    for est in (LikelihoodRatio(chunk=BIG_CHUNK, baseline="state", control_variate="taylor"),
                RLR(chunk=BIG_CHUNK, control_variate="taylor")):
        s = summarise(chain, est)
        assert not is_unbiased(s, chain.exact_grad()), f"bias only {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_taylor_cuts_the_variance_of_lr(chain: ToyChain) -> None:
    state = summarise(chain, LikelihoodRatio(chunk=BIG_CHUNK, baseline="state")).variance
    taylor = summarise(chain, LikelihoodRatio(chunk=BIG_CHUNK, baseline="state", control_variate="taylor")).variance
    # Measured 134 vs 181: on the toy most of what is left after the state baseline is the later
    # steps' noise, which no function of step k's noise can remove.
    assert taylor < 0.85 * state, f"taylor {taylor:.3g} vs state {state:.3g}"


# --- prompt groups sharing x_K (rlr_core/estimators/groups.py) ---------------------------------------

GROUPS = {
    "rlr-groups4-loo": lambda: RLR(chunk=BIG_CHUNK, baseline="loo", group_size=4),
    "rlr-groups4-state+loo": lambda: RLR(chunk=BIG_CHUNK, baseline="state+loo", group_size=4),
    "rlr-groups2-taylor": lambda: RLR(chunk=BIG_CHUNK, group_size=2, control_variate="taylor"),
    "rlr-zo-groups4": lambda: RLR(rest="zo", zo_scale=0.1, baseline="loo", group_size=4),
}


@pytest.mark.parametrize("name", list(GROUPS))
def test_prompt_groups_are_unbiased(chain: ToyChain, name: str) -> None:
    s = summarise(chain, GROUPS[name]())
    assert is_unbiased(s, chain.exact_grad()), f"{name}: max |bias| = {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_a_group_baseline_that_includes_the_row_itself_is_biased(chain: ToyChain, monkeypatch) -> None:
    """The broken variant: the group mean includes row b's own reward, which carries its own noise."""
    from rlr_core.estimators import baselines

    def group_mean(values: torch.Tensor, groups: torch.Tensor, alone: float | None = None) -> torch.Tensor:
        _, index = torch.unique(groups, return_inverse=True)
        sums = torch.zeros(int(index.max()) + 1, dtype=values.dtype).index_add_(0, index, values)
        counts = torch.zeros_like(sums).index_add_(0, index, torch.ones_like(values))
        return (sums / counts)[index]

    monkeypatch.setattr(baselines, "mean_of_others", group_mean)
    s = summarise(chain, RLR(chunk=BIG_CHUNK, baseline="loo", group_size=2))
    assert not is_unbiased(s, chain.exact_grad()), f"bias only {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_a_group_shares_its_initial_noise_and_nothing_else(chain: ToyChain) -> None:
    from rlr_core.estimators.groups import group_batch

    gen = torch.Generator().manual_seed(0)
    ctx, x_K, peers = group_batch(chain, ToyContext(8), gen, 4)
    assert peers.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and ctx.batch == 8
    assert torch.equal(x_K[0], x_K[3]) and not torch.equal(x_K[0], x_K[4])
    traj = chain.rollout(ctx, gen, x_K=x_K)
    assert torch.equal(traj.x[chain.num_steps], x_K)
    assert not torch.equal(traj.noise[5, 0], traj.noise[5, 1])  # every row draws its own eps_k
    with pytest.raises(ValueError):
        group_batch(chain, ToyContext(6), gen, 4)


# --- the exact KL regulariser (rlr_core/estimators/kl.py) ------------------------------------

def analytic_kl(chain: ToyChain) -> float:
    """On the toy mu_theta - mu_base = c_k (theta - theta_base) at every x: KL per row in closed form."""
    d2 = float(((chain.theta.detach() - chain.reference_theta) ** 2).sum())
    return sum(float(chain.c[k]) ** 2 * d2 / (2 * float(chain.sigma[k]) ** 2) for k in stochastic_steps(chain))


def test_kl_is_zero_at_init_positive_after_a_perturbation_and_pulls_back() -> None:
    toy = ToyChain(dim=4, steps=6)
    traj = toy.rollout(ToyContext(8), torch.Generator().manual_seed(0))
    assert float(kl_to_reference(toy, ToyContext(8), traj).detach().abs().max()) == 0.0
    delta = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float64)
    with torch.no_grad():
        toy.theta += delta
    kl = kl_to_reference(toy, ToyContext(8), traj)
    assert float(kl.detach().min()) > 0
    torch.testing.assert_close(kl, torch.full_like(kl, analytic_kl(toy)))
    toy.theta.grad = None
    RLR(chunk=BIG_CHUNK, kl_coef=1.0).accumulate(toy, ToyContext(8), torch.Generator().manual_seed(0))
    with_kl = toy.theta.grad.clone()
    toy.theta.grad = None
    RLR(chunk=BIG_CHUNK).accumulate(toy, ToyContext(8), torch.Generator().manual_seed(0))
    kl_grad = with_kl - toy.theta.grad  # the regulariser's share of what was accumulated
    assert float(kl_grad @ delta) > 0  # a descent step on .grad moves theta back towards the base


def moved_toy() -> tuple[ToyChain, ToyContext, object]:
    """A toy chain moved off its reference, a batch of 5 and one of its trajectories."""
    toy = ToyChain(dim=4, steps=6)
    with torch.no_grad():
        toy.theta += torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float64)
    ctx = ToyContext(5)
    return toy, ctx, toy.rollout(ctx, torch.Generator().manual_seed(1))


def test_kl_gradient_matches_finite_differences() -> None:
    from rlr_core.estimators.kl import kl_backward

    toy, ctx, traj = moved_toy()

    toy.theta.grad = None
    kl_backward(toy, ctx, traj, coef=0.7, steps=None)
    got = toy.theta.grad.clone()
    h = 1e-6
    want = torch.zeros_like(got)
    for i in range(len(got)):
        e = torch.zeros_like(got)
        e[i] = h
        with torch.no_grad():
            toy.theta += e
            up = float(kl_to_reference(toy, ctx, traj).mean())
            toy.theta -= 2 * e
            down = float(kl_to_reference(toy, ctx, traj).mean())
            toy.theta += e
        want[i] = 0.7 * (up - down) / (2 * h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("make", [lambda c: RLR(chunk=BIG_CHUNK, kl_coef=c, kl_steps=None),
                                  lambda c: RLR(rest="zo", kl_coef=c, kl_steps=None),
                                  lambda c: FullBackprop(use_checkpoint=False, kl_coef=c, kl_steps=None),
                                  lambda c: TruncatedBackprop(steps=2, kl_coef=c, kl_steps=None),
                                  lambda c: LikelihoodRatio(chunk=BIG_CHUNK, kl_coef=c, kl_steps=None),
                                  lambda c: DDPO(chunk=BIG_CHUNK, kl_coef=c, kl_steps=None),
                                  lambda c: AuthorsCode(kl_coef=c, kl_steps=None)],
                         ids=["rlr", "rlr-zo", "full-bp", "truncated-bp", "lr", "ddpo", "authors-code"])
def test_every_estimator_adds_exactly_the_kl_gradient(make) -> None:
    toy = ToyChain(dim=4, steps=6)
    delta = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float64)
    with torch.no_grad():
        toy.theta += delta
    grads, stats = [], []
    for coef in (0.0, 0.5):
        toy.theta.grad = None
        est = make(coef).accumulate(toy, ToyContext(8), torch.Generator().manual_seed(2))
        grads.append(toy.theta.grad.clone())
        stats.append(est.stats.get("kl", 0.0))
    # grad KL per row = sum_k c_k^2 (theta - theta_base) / sigma_k^2, the same for every row
    want = 0.5 * sum(float(toy.c[k]) ** 2 / float(toy.sigma[k]) ** 2 for k in stochastic_steps(toy)) * delta
    torch.testing.assert_close(grads[1] - grads[0], want)
    assert stats[1] == pytest.approx(analytic_kl(toy))


def test_the_kl_gradient_on_a_random_subset_of_steps_is_unbiased() -> None:
    """KL_STEPS: the scaled gradient at a random subset of steps averages to the full sum's."""
    from rlr_core.estimators.kl import kl_backward

    toy, ctx, traj = moved_toy()
    toy.theta.grad = None
    kl_backward(toy, ctx, traj, coef=1.0, steps=None)
    full = toy.theta.grad.clone()
    n_steps = len(stochastic_steps(toy))
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4000):
        toy.theta.grad = None
        kl_backward(toy, ctx, traj, coef=1.0, steps=2, generator=gen)
        draws.append(toy.theta.grad.clone())
    draws = torch.stack(draws)
    se = draws.std(0) / len(draws) ** 0.5
    assert n_steps > 2 and float(draws.std(0).max()) > 0  # it did subsample
    assert bool(((draws.mean(0) - full).abs() <= 4 * se + 1e-12).all())


def test_kl_to_the_parent_is_zero_at_the_parent_and_pulls_towards_it() -> None:
    """With a reference set (the round's parent: a trained adapter), the KL is zero there and not
    to the base model; its gradient is autograd of the closed form."""
    from rlr_core import rewards
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.estimators.backend_chain import BackendChain
    from rlr_core.estimators.kl import kl_backward
    from rlr_core.sampler import SamplerSettings
    from rlr_core.shapesworld import model as builtin_model
    from rlr_core.shapesworld.perception import PerceptionNet
    from rlr_core.training import lora

    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    lora.add_lora(backend, rank=2, seed=0)
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # the parent: an adapter that already moved off the base
    chain = BackendChain(backend, rewards.make_reward("fidelity", PerceptionNet().eval().requires_grad_(False)),
                         SamplerSettings(3, 1.0, 1.0))
    ctx = chain.context(["a red circle", "a blue square"])
    traj = chain.rollout(ctx, torch.Generator().manual_seed(0))
    assert float(kl_to_reference(chain, ctx, traj).detach().min()) > 0  # no reference yet: the base model
    chain.set_reference()
    assert float(kl_to_reference(chain, ctx, traj).detach().abs().max()) == 0.0  # zero at the parent
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.01)
    params = chain.parameters()
    closed = kl_to_reference(chain, ctx, traj).mean()
    want = torch.autograd.grad(0.3 * closed, params)
    for p in params:
        p.grad = None
    kl_backward(chain, ctx, traj, coef=0.3, steps=None)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w)


def test_kl_on_the_unet_uses_the_adapter_switched_off() -> None:
    from rlr_core import rewards
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.estimators.backend_chain import BackendChain
    from rlr_core.sampler import SamplerSettings
    from rlr_core.shapesworld import model as builtin_model
    from rlr_core.shapesworld.perception import PerceptionNet
    from rlr_core.training import lora

    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    lora.add_lora(backend, rank=2, seed=0)
    torch.manual_seed(1)
    chain = BackendChain(backend, rewards.make_reward("fidelity", PerceptionNet().eval().requires_grad_(False)),
                         SamplerSettings(3, 1.0, 1.0))
    ctx = chain.context(["a red circle", "a blue square"])
    traj = chain.rollout(ctx, torch.Generator().manual_seed(0))
    assert float(kl_to_reference(chain, ctx, traj).detach().abs().max()) == 0.0  # a fresh adapter is the base model
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    kl = kl_to_reference(chain, ctx, traj)
    assert float(kl.detach().min()) > 0
    kl.mean().backward()
    assert all(p.grad is not None for n, p in chain.named_parameters() if "lora_B" in n)
    # the adapter is switched back on afterwards: the adapted mean differs from the base one again
    x = traj.x[3]
    assert not torch.allclose(chain.mean(x, 3, ctx), chain.reference_mean(x, 3, ctx))


# --- the authors' released recipe, BIASED (rlr_core/estimators/authors_code.py) ----------------------

def test_authors_preset_is_what_it_says() -> None:
    from rlr_core.training import TrainConfig
    from rlr_core.training.cli import parse_args
    from rlr_core.training.presets import PRESETS, apply_preset

    preset = PRESETS["authors-code"]
    assert preset.biased and AuthorsCode.biased and "BIASED" in preset.summary
    assert preset.eta == 0.05
    opts = preset.estimator.options
    assert preset.estimator.name == "authors-code"
    assert (opts["chain_len"], opts["ho_coef"], opts["fo_steps"]) == (2, 1e-3, 1)
    config = apply_preset(TrainConfig(), "authors-code")
    assert config.sampler.eta == 0.05 and config.estimator.name == "authors-code"
    assert config.sampler.steps == TrainConfig().sampler.steps  # the rest is left alone
    assert parse_args(["--preset", "authors-code", "--out", "x"]).preset == "authors-code"


def test_authors_recipe_takes_separate_fo_and_ho_steps_and_is_biased(chain: ToyChain) -> None:
    toy = ToyChain(dim=4, steps=6)
    calls: list[float] = []

    def optimizer_step() -> float:
        calls.append(float(toy.theta.grad.norm()))
        with torch.no_grad():
            toy.theta -= 0.1 * toy.theta.grad
        return calls[-1]

    est = AuthorsCode().step(toy, ToyContext(8), torch.Generator().manual_seed(0), optimizer_step,
                             lambda: setattr(toy.theta, "grad", None))
    assert len(calls) == 2 and "ho_grad_norm" in est.stats  # FO step, then HO step
    # whitening, the 1e-3 weight and the missing rest-of-chain terms: far from the exact gradient
    s = summarise(chain, AuthorsCode(), batches=20)
    assert bias_in_se(s, chain.exact_grad()) > 10


def test_cli_flags_reach_the_estimators() -> None:
    from rlr_core.estimators import make_estimator
    from rlr_core.training.cli import estimator_options, parse_args

    args = parse_args(["--control-variate", "taylor", "--group-size", "2", "--kl-coef", "0.1", "--out", "x"])
    est = make_estimator("rlr", **estimator_options(args))
    assert (est.control_variate, est.group_size, est.kl_coef) == ("taylor", 2, 0.1)
    args = parse_args(["--estimator", "truncated-bp", "--kl-coef", "0.2", "--out", "x"])
    assert make_estimator("truncated-bp", **estimator_options(args)).kl_coef == 0.2


def test_cli_flags_left_out_take_the_estimators_own_defaults(capsys) -> None:
    from rlr_core.estimators import RLR, make_estimator
    from rlr_core.training.cli import OPTION_FLAGS, estimator_options, parse_args

    args = parse_args(["--out", "x"])
    assert estimator_options(args) == {}  # nothing passed: the dataclass decides
    assert make_estimator("rlr", **estimator_options(args)) == RLR()
    args = parse_args(["--estimator", "truncated-bp", "--truncate", "3", "--block", "4", "--out", "x"])
    assert estimator_options(args) == {"steps": 3}  # --block is RLR's, not truncated BP's
    fields = {name: {f.name for f in dataclasses.fields(ESTIMATORS[name])} for name in ESTIMATORS}
    assert all(field in fields[name] for names, field in OPTION_FLAGS.values() for name in names)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "(default: 0.3)" in capsys.readouterr().out  # --min-sigma-ratio's help, read from RLR
