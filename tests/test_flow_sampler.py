"""The flow-matching sampler (rlr_core/flow.py): the ODE against diffusers' Euler step, the SDE
against Flow-GRPO's published step, the Gaussian step log-probability, the SDE's marginals
against the ODE's on a Gaussian toy where both are exact, and every estimator on the flow toy
chain against its closed-form gradient (method doc section 10)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlr_core.estimators import DDPO, RLR, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.flow_toy_chain import FlowToyChain
from rlr_core.flow import make_flow_schedule, uniform_flow_schedule
from rlr_core.rollout import gaussian_log_prob
from tests.test_estimators_analytic import BIG_CHUNK, bias_in_se, summarise

SD3_LIKE = dict(num_train_timesteps=1000, shift=3.0)


def test_ode_step_is_the_schedulers_euler_step() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_LIKE)
    sched = make_flow_schedule(scheduler, 6, 0.0)
    assert float(sched.sigma.abs().max()) == 0.0
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    ref.set_timesteps(6)
    torch.testing.assert_close(sched.timesteps[1:].flip(0), ref.timesteps.float())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for i, t in enumerate(ref.timesteps):
        k = sched.num_steps - i
        v = torch.randn(x.shape, generator=gen)
        want = ref.step(v, t, x).prev_sample
        got = sched.from_output(v, x, k).mean
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        x = want


def flow_grpo_step(v, x, sigma, sigma_prev, sigma_max, a, prev):
    """Flow-GRPO's ``sde_step_with_logprob`` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py),
    restated: the mean, the std and log p summed over the dimensions (theirs is the mean)."""
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    log_prob = (-((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi)))
    return mean, std, log_prob.flatten(1).sum(1)


@pytest.mark.parametrize("a", [0.7, 0.3])
def test_sde_step_and_its_log_prob_are_flow_grpos(a: float) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_LIKE)
    sched = make_flow_schedule(scheduler, 10, a)
    ref = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    ref.set_timesteps(10)
    sigmas = [float(s) for s in ref.sigmas]
    assert sigmas[0] == 1.0  # the first step takes the clamp
    gen = torch.Generator().manual_seed(1)
    for i in range(10):
        k = 10 - i
        x, v = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
        prev = torch.randn(3, 4, 8, 8, generator=gen)
        mean, std, logp = flow_grpo_step(v, x, sigmas[i], sigmas[i + 1], sigmas[1], a, prev)
        got = sched.from_output(v, x, k).mean
        torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-5)
        assert float(sched.sigma[k]) == pytest.approx(std, rel=1e-5)
        torch.testing.assert_close(gaussian_log_prob(prev, got, sched.sigma[k]), logp, rtol=1e-5, atol=1e-2)
        # and against torch's own Gaussian density
        normal = torch.distributions.Normal(got, sched.sigma[k].expand_as(got))
        torch.testing.assert_close(gaussian_log_prob(prev, got, sched.sigma[k]),
                                   normal.log_prob(prev).flatten(1).sum(1), rtol=1e-5, atol=1e-2)


def test_per_sample_steps_equal_single_steps() -> None:
    sched = make_flow_schedule(FlowMatchEulerDiscreteScheduler(**SD3_LIKE), 5, 0.7)
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    ks = torch.tensor([5, 3, 1])
    batched = sched.from_output(v, x, ks)
    for b, k in enumerate(ks.tolist()):
        one = sched.from_output(v[b:b + 1], x[b:b + 1], k)
        torch.testing.assert_close(batched.mean[b:b + 1], one.mean)
        torch.testing.assert_close(batched.x0[b:b + 1], one.x0)


@pytest.mark.parametrize("t_start", [0.95, 1.0])
def test_sde_marginals_match_the_odes_on_a_gaussian_toy(t_start: float) -> None:
    """Data N(theta, s^2): the exact velocity is known, both samplers are linear, so each one's
    marginal at every step is computed exactly; with fine steps both tend to the true p_t.
    From t = 1 the SDE's first step (Flow-GRPO's clamp of s_t) is off, and the error decays."""
    theta = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    K = 2000
    runs = {}
    for a in (0.0, 0.7):
        chain = FlowToyChain(dim=4, noise_level=a, schedule=uniform_flow_schedule(K, a, t_start))
        with torch.no_grad():
            chain.theta.copy_(theta)
        runs[a] = chain.chain_marginals(*chain.marginal(t_start))
        assert float(chain.sigma[1:].min()) > 0 if a else float(chain.sigma.abs().max()) == 0
    ode, sde = runs[0.0], runs[0.7]
    times = [t_start, *[float(t) for t in chain.schedule.t_prev[1:].flip(0)]]  # time of entry i
    for i in range(0, K + 1, 100):
        m_true, v_true = chain.marginal(times[i])
        for m, v in (ode[i], sde[i]):
            # from t = 1 the SDE's early steps carry the clamp's transient (< 0.1), gone by x_0
            tol = 1e-3 if t_start < 1 or v is ode[i][1] or i == K else 0.1
            torch.testing.assert_close(m, m_true, rtol=0, atol=1e-3)
            torch.testing.assert_close(v, v_true, rtol=0, atol=tol)
    torch.testing.assert_close(sde[-1][1], ode[-1][1], rtol=0, atol=2e-3)  # x_0 ~ N(theta, s^2) both
    torch.testing.assert_close(sde[-1][1], torch.full_like(theta, 0.25), rtol=0, atol=1e-3)


def test_the_sampled_sde_and_ode_agree_in_distribution() -> None:
    """The same through the project's one sampling loop (Chain.rollout), by Monte Carlo."""
    moments = {}
    for a in (0.0, 0.7):
        chain = FlowToyChain(dim=2, noise_level=a, schedule=uniform_flow_schedule(200, a))
        traj = chain.rollout(type("Ctx", (), {"batch": 20000, "take": None})(), torch.Generator().manual_seed(3))
        moments[a] = (traj.x0.mean(0), traj.x0.var(0))
    for m, v in moments.values():
        torch.testing.assert_close(m, torch.zeros(2, dtype=torch.float64), rtol=0, atol=0.02)
        torch.testing.assert_close(v, torch.full((2,), 0.25, dtype=torch.float64), rtol=0.05, atol=0)


# --- every estimator on the flow toy chain ---------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> FlowToyChain:
    return FlowToyChain(dim=16, steps=10, noise_level=0.7)


UNBIASED = {
    "full-bp": lambda: FullBackprop(use_checkpoint=False),
    "lr": lambda: LikelihoodRatio(chunk=BIG_CHUNK),
    "ddpo-first-step": lambda: DDPO(chunk=BIG_CHUNK),
    "rlr-lr": lambda: RLR(rest="lr", chunk=BIG_CHUNK),
    "rlr-lr-h1-paper-tail": lambda: RLR(block=1, rest="lr", tail=1, chunk=BIG_CHUNK),
    "rlr-zo": lambda: RLR(rest="zo", zo_scale=0.1),
}


@pytest.mark.parametrize("name", list(UNBIASED))
def test_estimators_are_unbiased_on_the_flow_sde(chain: FlowToyChain, name: str) -> None:
    s = summarise(chain, UNBIASED[name](), batches=30, batch=256)
    assert bias_in_se(s, chain.exact_grad()) <= 3.0


def test_rlr_matches_full_bp_within_3_se(chain: FlowToyChain) -> None:
    full = summarise(chain, FullBackprop(use_checkpoint=False), batches=30, seed=5)
    rlr = summarise(chain, RLR(rest="lr", chunk=BIG_CHUNK), batches=30, seed=6)
    z = ((rlr.mean - full.mean) / (rlr.se**2 + full.se**2).sqrt()).abs().max()
    assert float(z) <= 3.0


def test_truncated_bp_is_biased_towards_its_truncated_gradient(chain: FlowToyChain) -> None:
    s = summarise(chain, TruncatedBackprop(steps=2), batches=30)
    assert bias_in_se(s, chain.exact_grad(steps=[1, 2])) <= 3.0
    assert bias_in_se(s, chain.exact_grad()) > 10


def test_rlr_without_the_rest_of_the_chain_is_biased(chain: FlowToyChain) -> None:
    s = summarise(chain, RLR(rest="none", chunk=BIG_CHUNK), batches=30)
    assert bias_in_se(s, chain.exact_grad()) > 10
