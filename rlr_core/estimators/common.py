"""Pieces every estimator shares: the estimate record, the baseline, pathwise runs, LR terms.

Sign convention (all estimators): ``accumulate`` adds an estimate of -grad J(theta), J = E[R(x_0)],
into each trainable parameter's ``.grad``, the way ``(-R.mean()).backward()`` would. An optimizer
step then increases the expected reward. Each estimate is a batch mean of per-sample terms.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from rlr_core.estimators.baselines import leave_one_out  # noqa: F401  (re-exported)
from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.rollout import Prediction, StepIndex, Trajectory, gaussian_log_prob, rollout


@dataclass
class Estimate:
    """What one call produced: the (detached) rewards and the surrogate loss value, plus extras."""

    rewards: torch.Tensor  # (B,)
    loss: float  # value of the surrogate whose gradient was accumulated
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def reward_mean(self) -> float:
        return float(self.rewards.mean())

    @property
    def reward_std(self) -> float:
        return float(self.rewards.std()) if len(self.rewards) > 1 else 0.0


class Estimator(abc.ABC):
    """A gradient estimator: ``accumulate`` adds an estimate of -grad J into ``.grad``; ``step``
    is one training step with it (the same call for every estimator)."""

    name: str

    @abc.abstractmethod
    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate: ...

    def step(self, chain: Chain, ctx: ChainContext, generator: torch.Generator,
             optimizer_step: Callable[[], float], zero_grad: Callable[[], None],
             check: Callable[[Estimate], None] | None = None) -> Estimate:
        """One training step on one batch: clear the gradients, accumulate an estimate, step.

        ``optimizer_step()`` applies the gradients and returns their norm (stored in the
        estimate's ``stats["grad_norm"]``); ``check(estimate)``, if given, runs before any
        optimiser step the estimate leads to (e.g. to stop on a non-finite reward). Estimators
        that take several optimiser steps per batch (DDPO) override this."""
        zero_grad()
        est = self.accumulate(chain, ctx, generator)
        if check is not None:
            check(est)
        est.stats["grad_norm"] = optimizer_step()
        return est

    def settings(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def fo_tail_length(sigma: torch.Tensor, min_sigma_ratio: float) -> int:
    """Default L: the smallest tail such that every step k > L has sigma_k >= ratio * max sigma.

    Likelihood ratios scale like 1/sigma_k and are undefined at sigma_k = 0, so those final
    near-deterministic steps are covered pathwise instead (method doc section 3)."""
    s = sigma[1:]
    threshold = min_sigma_ratio * float(s.max())
    weak = [k for k in range(1, len(sigma)) if float(sigma[k]) < threshold or float(sigma[k]) <= 0]
    return max([1, *weak])


def deterministic_tail(sigma: torch.Tensor) -> int:
    """Number of final steps with sigma_k = 0 (a likelihood ratio cannot credit them)."""
    L = 0
    while L + 1 < len(sigma) and float(sigma[L + 1]) <= 0:
        L += 1
    return L


def mean_with_graph(chain: Chain, x: torch.Tensor, k: int | torch.Tensor, ctx: ChainContext,
                    use_checkpoint: bool = True) -> torch.Tensor:
    """mu_theta(x_k, k) kept in the graph. Checkpointed: only x_k is saved per step, and the
    UNet's activations are recomputed in backward (one step's graph alive at a time)."""
    return checkpoint(chain.mean, x, k, ctx, use_reentrant=False) if use_checkpoint else chain.mean(x, k, ctx)


def pathwise(chain: Chain, ctx: ChainContext, x_start: torch.Tensor, k_start: StepIndex,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
             use_checkpoint: bool = True, steps: int | None = None) -> torch.Tensor:
    """Run steps k_start .. 1 keeping the graph (the FO term, doc section 2): x_0 as a function of theta.

    Noise comes from ``noise[k]`` (a recorded trajectory) or is drawn from ``generator``. With
    ``steps``, only that many steps are run (``k_start`` may then be a per-row (B,) tensor)."""

    def predict(x: torch.Tensor, k: StepIndex) -> Prediction:
        return Prediction(mean_with_graph(chain, x, k, ctx, use_checkpoint))

    source = noise if noise is not None else generator
    return rollout(predict, x_start, chain.sigma, source, start=k_start, steps=steps).x


def fo_backward(chain: Chain, ctx: ChainContext, traj: Trajectory, tail: int,
                use_checkpoint: bool = True) -> torch.Tensor:
    """FO on the last ``tail`` steps: backprop R through steps tail..1 from the recorded x_tail.

    Accumulates -mean_b dR_b/dtheta (restricted to those steps) and returns the rewards R (B,)."""
    x0 = pathwise(chain, ctx, traj.x[tail].detach(), tail, noise=traj.noise, use_checkpoint=use_checkpoint)
    R = chain.reward(x0, ctx)
    (-R.mean()).backward()
    return R.detach()


def log_prob_terms(chain: Chain, ctx: ChainContext, traj: Trajectory, ks: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """log p_theta(x_{k-1} | x_k) for the (k, row) pairs given, differentiable in theta."""
    x_k = traj.x[ks, rows]
    mu = chain.mean(x_k, ks, ctx.take(rows))
    return gaussian_log_prob(traj.x[ks - 1, rows], mu, chain.sigma[ks].to(mu))


def lr_backward(chain: Chain, ctx: ChainContext, traj: Trajectory, ks: torch.Tensor, rows: torch.Tensor,
                weights: torch.Tensor, chunk: int, slopes: torch.Tensor | None = None) -> float:
    """Accumulate -(1/B) sum_pairs w * grad log p(x_{k-1} | x_k) (the LR term, doc section 2).

    Pairs (k, row) run in chunks of per-sample steps (batched UNet calls), one backward per
    chunk, so memory stays at one UNet graph per chunk. ``weights`` already hold (R - b). With
    ``slopes`` a_k (the Taylor control variate), also -(1/B) sum_pairs (d mu/d theta)^T a_k, the
    exact expectation of the linear term the weights had subtracted."""
    B = ctx.batch
    total = 0.0
    for start in range(0, len(ks), chunk):
        sl = slice(start, start + chunk)
        k, r = ks[sl], rows[sl]
        mu = chain.mean(traj.x[k, r], k, ctx.take(r))
        logp = gaussian_log_prob(traj.x[k - 1, r], mu, chain.sigma[k].to(mu))
        loss = -(weights[sl].to(logp) * logp).sum() / B
        if slopes is not None:
            loss = loss - (slopes[sl].to(mu) * mu).sum() / B
        loss.backward()
        total += float(loss.detach())
    return total
