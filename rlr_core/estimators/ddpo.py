"""DDPO (Black et al. 2023): per-step likelihood ratios with PPO clipping and several optimiser
steps (inner epochs) per batch of samples (method doc section 4).

With r_{b,k} = p_theta(x_{k-1} | x_k) / p_theta_old(x_{k-1} | x_k) and A_b = R_b - b_b:

    loss = (1/B) sum_b sum_k max(-A_b r_{b,k}, -A_b clip(r_{b,k}, 1 - eps, 1 + eps))

At the first inner step theta = theta_old, r = 1 and grad(loss) = -(1/B) sum A_b sum_k grad log p:
exactly the LR gradient (``accumulate`` returns that step). Deterministic final steps
(sigma_k = 0) have no ratio; they are credited pathwise, as in :mod:`.likelihood_ratio`.
Because DDPO takes its own optimiser steps, it overrides ``Estimator.step`` (the training step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.common import (
    Estimate,
    Estimator,
    deterministic_tail,
    fo_backward,
    leave_one_out,
)
from rlr_core.estimators.kl import KL_STEPS, kl_coef_option, kl_term
from rlr_core.estimators.likelihood_ratio import stochastic_pairs
from rlr_core.estimators.schema import option
from rlr_core.rollout import Trajectory


@dataclass
class DDPO(Estimator):
    inner_epochs: int = option(4, label="inner epochs", low=1, help="optimiser steps per batch")
    # DDPO's published setting; ratios of a whole image are sharp
    clip_range: float = option(1e-4, label="clip range", low=0.0, help="PPO clip range of the ratios")
    # DDPO does; changes the gradient's scale
    whiten: bool = option(False, label="whiten", help="divide advantages by the reward std")
    chunk: int = 16
    kl_coef: float = kl_coef_option()  # the KL regulariser to the round's parent (kl.py), every inner step
    kl_steps: int | None = KL_STEPS  # the KL's gradient at this many random steps (None: every step)
    name: ClassVar[str] = "ddpo"

    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate:
        """The gradient of the first inner step (theta = theta_old): the LR gradient."""
        batch = self._collect(chain, ctx, generator)
        return self._inner_step(chain, ctx, *batch)

    def step(self, chain: Chain, ctx: ChainContext, generator: torch.Generator,
             optimizer_step: Callable[[], float], zero_grad: Callable[[], None],
             check: Callable[[Estimate], None] | None = None) -> Estimate:
        """Sample one batch, then ``inner_epochs`` optimiser steps on it (see ``Estimator.step``).

        Returns the first inner step's estimate, with the first step's gradient norm and the
        mean clip fraction over the inner steps in its stats."""
        batch = self._collect(chain, ctx, generator)
        first: Estimate | None = None
        clipped = []
        for _ in range(self.inner_epochs):
            zero_grad()
            est = self._inner_step(chain, ctx, *batch)
            if check is not None:
                check(est)
            est.stats["grad_norm"] = optimizer_step()
            clipped.append(est.stats["clip_fraction"])
            first = first or est
        first.stats["clip_fraction"] = sum(clipped) / len(clipped)
        return first

    def update(self, chain: Chain, ctx: ChainContext, generator: torch.Generator,
               optimizer_step: Callable[[], float] | torch.optim.Optimizer,
               zero_grad: Callable[[], None] | None = None) -> Estimate:
        """:meth:`step` with a torch optimizer, or with the two callables ``step`` takes."""
        if isinstance(optimizer_step, torch.optim.Optimizer):
            optimizer = optimizer_step
            zero_grad = optimizer.zero_grad

            def optimizer_step() -> float:
                norm = torch.sqrt(sum((p.grad**2).sum() for g in optimizer.param_groups for p in g["params"]
                                      if p.grad is not None))
                optimizer.step()
                return float(norm)

        return self.step(chain, ctx, generator, optimizer_step, zero_grad)

    def _collect(self, chain: Chain, ctx: ChainContext, generator: torch.Generator):
        traj = chain.rollout(ctx, generator)
        tail = deterministic_tail(chain.sigma)
        with torch.no_grad():
            R = chain.reward(traj.x0, ctx)
        A = leave_one_out(R)
        if self.whiten and len(R) > 1:
            A = A / (R.std() + 1e-8)
        ks, rows = stochastic_pairs(tail + 1, chain.num_steps, ctx.batch)
        return traj, R, A, tail, ks, rows

    def _inner_step(self, chain: Chain, ctx: ChainContext, traj: Trajectory, R: torch.Tensor, A: torch.Tensor,
                    tail: int, ks: torch.Tensor, rows: torch.Tensor) -> Estimate:
        loss_value, n_clipped = 0.0, 0
        if tail:
            fo_backward(chain, ctx, traj, tail)  # pathwise credit of the deterministic steps
            loss_value -= float(R.mean())
        for start in range(0, len(ks), self.chunk):
            k, b = ks[start:start + self.chunk], rows[start:start + self.chunk]
            mu = chain.mean(traj.x[k, b], k, ctx.take(b))
            ratio = torch.exp(log_ratio(mu, traj.mean[k, b], traj.noise[k, b], chain.sigma[k].to(mu)))
            per_row, outside = clipped_surrogate(ratio, A[b].to(mu), self.clip_range)
            loss = per_row.sum() / ctx.batch
            loss.backward()
            loss_value += float(loss.detach())
            n_clipped += outside
        stats = {"clip_fraction": n_clipped / max(len(ks), 1)}
        # the KL's subset of steps from torch's global generator (seeded by the round): no generator here
        loss_value += kl_term(chain, ctx, traj, self.kl_coef, self.kl_steps, stats)
        return Estimate(R, loss_value, stats)


def log_ratio(mu_new: torch.Tensor, mu_old: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log p_new(x_{k-1}|x_k) - log p_old(x_{k-1}|x_k) per row, with x_{k-1} = mu_old + sigma eps.

    Written through d = mu_new - mu_old, (2 sigma <d, eps> - |d|^2) / (2 sigma^2), instead of a
    difference of two log-densities of size ~dim/2 each: that difference loses ~1e-4 to float32
    rounding, as much as DDPO's clip range. Its gradient is grad log p_new, as it must be."""
    d = (mu_new - mu_old).flatten(1)
    e = eps.flatten(1)
    return (2 * sigma * (d * e).sum(1) - (d * d).sum(1)) / (2 * sigma**2)


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, int]:
    """PPO's clipped objective per row, max(-A r, -A clip(r, 1 - c, 1 + c)) (to minimise), and how many
    rows' ratios lie outside the clip range."""
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(-adv * ratio, -adv * clipped), int(((ratio - 1).abs() > clip_range).sum())
