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

from rlr_core.estimators.baselines import Baseline
from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.common import (
    Estimate,
    Estimator,
    deterministic_tail,
    fo_backward,
    lr_backward,
)
from rlr_core.estimators.control_variate import pair_advantages, taylor_advantages
from rlr_core.estimators.kl import KL_STEPS, kl_coef_option, kl_term
from rlr_core.estimators.schema import option


def stochastic_pairs(first: int, last: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (k, row) pairs with first <= k <= last, step-major."""
    ks = torch.arange(last, first - 1, -1).repeat_interleave(batch)
    rows = torch.arange(batch).repeat(max(last - first + 1, 0))
    return ks, rows


@dataclass
class LikelihoodRatio(Estimator):
    chunk: int = 16  # (k, row) pairs per batched denoiser call
    baseline: Baseline = option("loo", label="baseline",  # see rlr_core/estimators/baselines.py
                                help="what R is compared with in likelihood-ratio terms (docs/method.md section 2)")
    control_variate: Literal["none", "taylor"] = option(  # see rlr_core/estimators/control_variate.py
        "none", label="control variate", help="the first-order (Taylor) control variate on likelihood-ratio terms")
    kl_coef: float = kl_coef_option()  # see rlr_core/estimators/kl.py
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
        A, slopes = pair_advantages(chain, ctx, traj, R, ks, rows, self.baseline, self.control_variate, self.chunk,
                                    groups=ks)
        if slopes is not None:
            A = taylor_advantages(A, slopes, traj.x[ks - 1, rows], traj, ks, rows)
        loss += lr_backward(chain, ctx, traj, ks, rows, A, self.chunk, slopes)
        stats = {}
        loss += kl_term(chain, ctx, traj, self.kl_coef, self.kl_steps, stats, generator)
        return Estimate(R, loss, stats)
