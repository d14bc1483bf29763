"""The real estimators on the linear-Gaussian toy chain, against its closed-form gradient.

Each check draws n independent batch-mean estimates (fixed seeds) and compares their mean with
the exact grad J coordinate by coordinate in standard errors. Unbiased estimators must stay
within 4 SE on all 16 coordinates; biased ones must be far outside. Variance = trace of the
per-sample covariance (batch size x covariance of batch means).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rlr_core.estimators import DDPO, RLR, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.common import Estimate, Estimator, fo_tail_length
from rlr_core.estimators.toy_chain import ToyChain, ToyContext

BIG_CHUNK = 1 << 20  # the toy is vectorised: all (k, row) pairs in one call
TOL_SE = 4.0


@dataclass
class Summary:
    mean: torch.Tensor
    se: torch.Tensor
    variance: float  # trace of the per-sample covariance


def summarise(chain: ToyChain, est: Estimator, batches: int = 40, batch: int = 256, seed: int = 0) -> Summary:
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(batches):
        chain.theta.grad = None
        est.accumulate(chain, ToyContext(batch), gen)
        draws.append(-chain.theta.grad.clone())  # .grad holds -grad J
    G = torch.stack(draws)
    return Summary(G.mean(0), G.std(0) / batches**0.5, float(G.var(0).sum() * batch))


def bias_in_se(s: Summary, exact: torch.Tensor) -> float:
    return float(((s.mean - exact) / s.se).abs().max())


def is_unbiased(s: Summary, exact: torch.Tensor, tol: float = TOL_SE) -> bool:
    """The check every unbiasedness test uses: all coordinates within ``tol`` standard errors."""
    return bias_in_se(s, exact) <= tol


@pytest.fixture(scope="module")
def chain() -> ToyChain:
    return ToyChain(dim=16, steps=20)


UNBIASED = {
    "full-bp": lambda: FullBackprop(use_checkpoint=False),  # checkpointing saves nothing on the toy
    "lr": lambda: LikelihoodRatio(chunk=BIG_CHUNK),
    "ddpo-first-step": lambda: DDPO(chunk=BIG_CHUNK),
    "rlr-lr": lambda: RLR(rest="lr", chunk=BIG_CHUNK),
    "rlr-lr-h1": lambda: RLR(block=1, rest="lr", chunk=BIG_CHUNK),
    "rlr-lr-subsampled": lambda: RLR(rest="lr", rest_steps=4, chunk=BIG_CHUNK),
    "rlr-lr-paper-tail": lambda: RLR(rest="lr", tail=1, chunk=BIG_CHUNK),
    "rlr-zo": lambda: RLR(rest="zo", zo_scale=0.1),
    "rlr-grad-norm-start": lambda: RLR(rest="lr", block_start="grad-norm", chunk=BIG_CHUNK),
    "rlr-dcot-window": lambda: RLR(rest="lr", window=(8, 14), block=3, chunk=BIG_CHUNK),
    "rlr-auto-block": lambda: RLR(rest="lr", block="auto", memory_budget_gb=1e-5, chunk=BIG_CHUNK),
}


@pytest.mark.parametrize("name", list(UNBIASED))
def test_unbiased(chain: ToyChain, name: str) -> None:
    # rlr-zo: with a linear chain and quadratic reward the parameter-smoothed objective differs
    # from J by a constant, so its smoothing bias is exactly zero and the same check applies.
    s = summarise(chain, UNBIASED[name]())
    assert is_unbiased(s, chain.exact_grad()), f"{name}: max |bias| = {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_truncated_bp_is_biased_towards_its_truncated_gradient(chain: ToyChain) -> None:
    s = summarise(chain, TruncatedBackprop(steps=2))
    assert bias_in_se(s, chain.exact_grad()) > 50
    # ...and it is exactly the gradient credited to the last two steps.
    assert is_unbiased(s, chain.exact_grad(steps=[1, 2]))


def test_rlr_without_rest_of_chain_is_biased(chain: ToyChain) -> None:
    s = summarise(chain, RLR(rest="none", chunk=BIG_CHUNK))
    assert bias_in_se(s, chain.exact_grad()) > 10


def test_variance_order_full_bp_rlr_lr(chain: ToyChain) -> None:
    """Paper's ordering: full BP < RLR < LR; and the L = 2 tail beats the paper's L = 1 here (both
    with the leave-one-out baseline, the paper's)."""
    var = {name: summarise(chain, make(), batches=20).variance for name, make in {
        "full-bp": lambda: FullBackprop(use_checkpoint=False),  # checkpointing saves nothing on the toy
        "rlr": lambda: RLR(rest="lr", chunk=BIG_CHUNK, baseline="loo"),
        "rlr-L1": lambda: RLR(rest="lr", tail=1, chunk=BIG_CHUNK, baseline="loo"),
        "lr": lambda: LikelihoodRatio(chunk=BIG_CHUNK),
    }.items()}
    assert var["full-bp"] < var["rlr"] < var["lr"], var
    assert var["rlr"] * 5 < var["rlr-L1"], var


class Flipped(Estimator):
    """A deliberately mis-signed estimator: accumulates +grad J instead of -grad J."""

    name = "flipped"

    def __init__(self, inner: Estimator):
        self.inner = inner

    def accumulate(self, chain, ctx, generator) -> Estimate:
        est = self.inner.accumulate(chain, ctx, generator)
        for p in chain.parameters():
            p.grad.neg_()
        return est


def test_a_mis_signed_estimator_fails_the_check(chain: ToyChain) -> None:
    exact = chain.exact_grad()
    for inner in (FullBackprop(use_checkpoint=False), RLR(rest="lr", chunk=BIG_CHUNK)):
        s = summarise(chain, Flipped(inner))
        assert not is_unbiased(s, exact)


def test_the_check_catches_a_small_scale_error(chain: ToyChain) -> None:
    s = summarise(chain, FullBackprop(use_checkpoint=False))
    assert is_unbiased(s, chain.exact_grad())
    assert not is_unbiased(s, 1.1 * chain.exact_grad())


def test_ddpo_first_inner_step_is_the_lr_gradient(chain: ToyChain) -> None:
    grads = []
    for est in (LikelihoodRatio(chunk=BIG_CHUNK), DDPO(chunk=BIG_CHUNK)):
        chain.theta.grad = None
        est.accumulate(chain, ToyContext(64), torch.Generator().manual_seed(3))
        grads.append(chain.theta.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_ddpo_update_takes_inner_steps(chain: ToyChain) -> None:
    toy = ToyChain(dim=4, steps=6)
    opt = torch.optim.SGD(toy.parameters(), lr=1e-3)
    calls = []

    def step() -> float:
        calls.append(1)
        opt.step()
        return 0.0

    est = DDPO(inner_epochs=3, clip_range=0.2, chunk=BIG_CHUNK).update(
        toy, ToyContext(32), torch.Generator().manual_seed(0), step, lambda: opt.zero_grad())
    assert len(calls) == 3 and 0.0 <= est.stats["clip_fraction"] <= 1.0
    assert toy.theta.abs().sum() > 0
    moved = toy.theta.detach().clone()
    DDPO(inner_epochs=2, chunk=BIG_CHUNK).update(toy, ToyContext(32), torch.Generator().manual_seed(1), opt)
    assert not torch.equal(toy.theta.detach(), moved)  # a plain optimizer works too


def test_default_tail_covers_the_near_deterministic_steps(chain: ToyChain) -> None:
    # sigma: ..., 0.24 (step 4), 0.15 (step 3), 0.01 (step 2), 0 (step 1); max 0.78.
    assert fo_tail_length(chain.sigma, 0.1) == 2  # below 0.078: steps 1 and 2 go pathwise
    assert RLR().tail_length(chain) == 3  # the default ratio 0.3 (below 0.234): step 3 too


def test_estimators_share_the_trajectory_of_a_generator_state(chain):
    """From one generator state every estimator but ZO-RLR samples the same trajectories (the
    estimator benchmark pairs estimates on them); ZO-RLR's perturbed steps change its own."""
    def rewards(est: Estimator) -> torch.Tensor:
        chain.theta.grad = None
        out = est.accumulate(chain, ToyContext(8), torch.Generator().manual_seed(123)).rewards
        chain.theta.grad = None
        return out

    reference = rewards(FullBackprop(use_checkpoint=False))
    for est in (TruncatedBackprop(steps=2), LikelihoodRatio(chunk=BIG_CHUNK), DDPO(chunk=BIG_CHUNK),
                RLR(rest="lr", chunk=BIG_CHUNK), RLR(rest="lr", rest_steps=3, chunk=BIG_CHUNK),
                RLR(rest="none")):
        torch.testing.assert_close(rewards(est), reference, msg=f"{est.name} sampled another trajectory")
    assert not torch.allclose(rewards(RLR(rest="zo", zo_scale=0.5)), reference)


def test_a_window_at_the_end_of_the_chain_shortens_the_default_tail(chain: ToyChain) -> None:
    # DCoT's fine stage at the end: the default L = 3 would leave no block start in [1, 3].
    rlr = RLR(block=2, window=(1, 3))
    L = rlr.tail_length(chain)
    assert L == 2
    assert rlr.start_range(chain, L, 2) == (3, 3)


@pytest.mark.parametrize("est", [RLR(chunk=BIG_CHUNK), RLR(rest="zo"), FullBackprop(use_checkpoint=False),
                                 TruncatedBackprop(steps=2), LikelihoodRatio(chunk=BIG_CHUNK),
                                 DDPO(inner_epochs=2, chunk=BIG_CHUNK)], ids=lambda e: e.name)
def test_every_estimator_trains_through_one_step_interface(est: Estimator) -> None:
    """``step`` is the training loop's one call: clear, estimate, check, then each optimiser step."""
    toy = ToyChain(dim=4, steps=6)
    events: list[str] = []

    def zero_grad() -> None:
        events.append("zero")
        toy.theta.grad = None

    def optimizer_step() -> float:
        events.append("step")
        norm = float(toy.theta.grad.norm())
        with torch.no_grad():
            toy.theta -= 0.1 * toy.theta.grad
        return norm

    out = est.step(toy, ToyContext(8), torch.Generator().manual_seed(0), optimizer_step, zero_grad,
                   check=lambda e: events.append("check"))
    inner = est.inner_epochs if isinstance(est, DDPO) else 1
    assert events == ["zero", "check", "step"] * inner
    assert out.stats["grad_norm"] > 0 and toy.theta.abs().sum() > 0


# --- state-dependent baselines (rlr_core/estimators/baselines.py) ------------------------------

STATE_BASELINES = {
    "lr-state": lambda: LikelihoodRatio(chunk=BIG_CHUNK, baseline="state"),
    "lr-state+loo": lambda: LikelihoodRatio(chunk=BIG_CHUNK, baseline="state+loo"),
    "rlr-lr-state": lambda: RLR(rest="lr", chunk=BIG_CHUNK, baseline="state"),
    "rlr-lr-state+loo": lambda: RLR(rest="lr", chunk=BIG_CHUNK, baseline="state+loo"),
    "rlr-lr-h1-state+loo-paper-tail": lambda: RLR(block=1, tail=1, rest="lr", chunk=BIG_CHUNK, baseline="state+loo"),
    "rlr-zo-state": lambda: RLR(rest="zo", zo_scale=0.1, baseline="state"),  # HO only; ZO keeps LOO
}


@pytest.mark.parametrize("name", list(STATE_BASELINES))
def test_state_baselines_are_unbiased(chain: ToyChain, name: str) -> None:
    s = summarise(chain, STATE_BASELINES[name]())
    assert is_unbiased(s, chain.exact_grad()), f"{name}: max |bias| = {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_a_baseline_that_sees_the_steps_own_noise_is_biased(chain: ToyChain, monkeypatch) -> None:
    """The broken variant: the baseline of step k looks at x_{k-1} = mu_k + sigma_k eps_k instead of
    mu_k. It correlates with the score of that very noise, so the check must flag it."""
    from rlr_core.estimators import baselines

    monkeypatch.setattr(baselines, "noise_free_next", lambda traj, ks, rows: traj.x[ks - 1, rows])
    s = summarise(chain, LikelihoodRatio(chunk=BIG_CHUNK, baseline="state"))
    assert not is_unbiased(s, chain.exact_grad()), f"bias only {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_state_baselines_cut_the_variance_of_lr(chain: ToyChain) -> None:
    loo = summarise(chain, LikelihoodRatio(chunk=BIG_CHUNK)).variance
    state = summarise(chain, LikelihoodRatio(chunk=BIG_CHUNK, baseline="state+loo")).variance
    assert state < loo / 2, f"state+loo {state:.3g} vs loo {loo:.3g}"


def test_state_plus_loo_subtracts_the_other_rows_mean_residual_per_group() -> None:
    from rlr_core.estimators.baselines import advantages

    R = torch.tensor([1.0, 2.0, 4.0])
    rows = torch.tensor([0, 1, 2, 0, 1])
    T = torch.tensor([0.5, 1.0, 3.0, 1.0, 2.0])
    groups = torch.tensor([5, 5, 5, 4, 4])
    A = advantages(R, rows, "state+loo", T, groups)
    # group 5 residuals 0.5, 1, 1; group 4 residuals 0, 0
    want = torch.tensor([0.5 - 1.0, 1.0 - 0.75, 1.0 - 0.75, 0.0, 0.0])
    assert torch.allclose(A, want)
    assert torch.allclose(advantages(R, rows, "state", T), R[rows] - T)


@pytest.mark.parametrize("branches,baseline,batches", [(2, "loo", 40), (4, "loo", 40), (4, "state", 120)])
def test_branching_at_the_ho_block_is_unbiased(chain: ToyChain, branches: int, baseline: str, batches: int) -> None:
    # With the state baseline on the rest of the chain, 40 batches gave 4.7, 1.7 and 1.5 SE on
    # seeds 0-2 and 200 batches 1.7 SE: the likelihood-ratio terms are heavy-tailed, so the SE of
    # 40 batch means is itself noisy; 120 batches keep that check honest.
    s = summarise(chain, RLR(rest="lr", chunk=BIG_CHUNK, branches=branches, baseline=baseline), batches=batches)
    assert is_unbiased(s, chain.exact_grad()), f"M={branches}: max |bias| = {bias_in_se(s, chain.exact_grad()):.1f} SE"


def test_branches_that_do_not_redraw_the_block_noise_are_biased(chain: ToyChain, monkeypatch) -> None:
    """The broken variant: branches that end the block at its mean (no fresh eps_j) carry no score,
    so averaging over the M branches shrinks the HO term; the check must flag it."""
    from rlr_core.estimators import rlr as rlr_module

    monkeypatch.setattr(rlr_module, "draw_noise", lambda like, gen: torch.zeros_like(like))
    est = RLR(rest="lr", chunk=BIG_CHUNK, branches=4, block=3)
    s = summarise(chain, est)
    assert not is_unbiased(s, chain.exact_grad()), f"bias only {bias_in_se(s, chain.exact_grad()):.1f} SE"
