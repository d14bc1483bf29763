"""Likelihood ratio at every step (REINFORCE, DDPO's per-step term; method doc section 2, LR).

    g = (R - b) * sum_k grad_theta log p_theta(x_{k-1} | x_k)
      = (R - b) * sum_k (d mu_theta / d theta)^T (x_{k-1} - mu_theta) / sigma_k^2

with b the leave-one-out batch mean. A likelihood ratio is undefined where sigma_k = 0 (the
final step of DDIM with set_alpha_to_one), so those deterministic final steps are credited
pathwise (FO, exact) instead; without that the estimator would miss their share of grad J.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from rlr_core.estimators.baselines import Baseline, advantages, state_values
from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.common import (
    Estimate,
    Estimator,
    deterministic_tail,
    fo_backward,
    lr_backward,
)
from rlr_core.estimators.control_variate import linear_term, linearisation_point, surrogate_and_slope
from rlr_core.estimators.kl import KL_STEPS, kl_backward


def stochastic_pairs(first: int, last: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (k, row) pairs with first <= k <= last, step-major."""
    ks = torch.arange(last, first - 1, -1).repeat_interleave(batch)
    rows = torch.arange(batch).repeat(max(last - first + 1, 0))
    return ks, rows


@dataclass
class LikelihoodRatio(Estimator):
    chunk: int = 16  # (k, row) pairs per batched denoiser call
    baseline: Baseline = "loo"  # see rlr_core/estimators/baselines.py
    control_variate: Literal["none", "taylor"] = "none"  # see rlr_core/estimators/control_variate.py
    kl_coef: float = 0.0  # see rlr_core/estimators/kl.py
    kl_steps: int | None = KL_STEPS  # the KL's gradient at this many random steps (None: every step)
    name: ClassVar[str] = "lr"

    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate:
        tail = deterministic_tail(chain.sigma)
        traj = chain.rollout(ctx, generator)
        loss = 0.0
        if tail:  # FO on the deterministic steps (doc section 2, FO)
            R = fo_backward(chain, ctx, traj, tail)
            loss -= float(R.mean())
        else:
            R = chain.reward(traj.x0, ctx).detach()
        ks, rows = stochastic_pairs(tail + 1, chain.num_steps, ctx.batch)
        slopes = None
        if self.control_variate == "taylor":
            values, slopes = surrogate_and_slope(chain, ctx, traj, ks, rows, self.chunk)
        else:
            values = None if self.baseline == "loo" else state_values(chain, ctx, traj, ks, rows, self.chunk)
        A = advantages(R, rows, self.baseline, values, groups=ks)
        if slopes is not None:
            A = A - linear_term(slopes, traj.x[ks - 1, rows], linearisation_point(traj, ks, rows))
        loss += lr_backward(chain, ctx, traj, ks, rows, A, self.chunk, slopes)
        stats = {}
        if self.kl_coef:
            stats["kl"] = kl_backward(chain, ctx, traj, self.kl_coef, self.kl_steps, generator)
            loss += self.kl_coef * stats["kl"]
        return Estimate(R, loss, stats)
