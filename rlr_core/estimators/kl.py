"""The exact KL-to-base regulariser, an option of every estimator (docs/method.md section 2).

Each step is Gaussian with the same sigma_k under the adapted and the base model, so the KL
between their step distributions at a state x_k is exact and closed-form:

    KL_k(x_k) = ||mu_theta(x_k, k, c) - mu_base(x_k, k, c)||^2 / (2 sigma_k^2)
    KL        = (1/B) sum_b sum_{k: sigma_k > 0} KL_k(x_{k,b})   along the sampled trajectories

Steps with sigma_k = 0 (DDIM's deterministic final step) are skipped: two point masses at
different means have infinite KL, and nothing stochastic happens there to regularise.
With ``kl_coef`` = beta the estimators maximise J - beta KL: they add beta * grad KL (the states
x_k held fixed, as Flow-GRPO's per-step KL does) to the -grad J they accumulate.
"""

from __future__ import annotations

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.rollout import Trajectory


def step_kl(chain: Chain, ctx: ChainContext, traj: Trajectory, k: int) -> torch.Tensor:
    """KL_k(x_k) per row (B,), differentiable in theta; x_k taken from ``traj`` (detached)."""
    x = traj.x[k].detach()
    base = chain.base_mean(x, k, ctx).detach()
    mu = chain.mean(x, k, ctx)
    return ((mu - base) ** 2).flatten(1).sum(1) / (2 * float(chain.sigma[k]) ** 2)


def stochastic_steps(chain: Chain) -> list[int]:
    """The steps the KL covers: sigma_k > 0 (see the module docstring)."""
    return [k for k in range(1, chain.num_steps + 1) if float(chain.sigma[k]) > 0]


def kl_to_base(chain: Chain, ctx: ChainContext, traj: Trajectory) -> torch.Tensor:
    """sum_k KL_k(x_k) per row (B,), differentiable in theta."""
    return sum((step_kl(chain, ctx, traj, k) for k in stochastic_steps(chain)),
               torch.zeros(ctx.batch, dtype=traj.x.dtype, device=traj.x.device))


def kl_backward(chain: Chain, ctx: ChainContext, traj: Trajectory, coef: float) -> float:
    """Add coef * grad KL into ``.grad`` (the regulariser's share of the estimate); returns KL.
    One backward per step, so one denoiser graph is alive at a time."""
    if coef == 0:
        return 0.0
    total = 0.0
    for k in stochastic_steps(chain):
        kl = step_kl(chain, ctx, traj, k).mean()
        (coef * kl).backward()
        total += float(kl.detach())
    return total


def replay(chain: Chain, ctx: ChainContext, generator_state: torch.Tensor) -> Trajectory:
    """The trajectory an estimator that does not record one (full or truncated BP) sampled from
    ``generator_state``: the same draws in the same order, recorded without a graph."""
    gen = torch.Generator("cpu")
    gen.set_state(generator_state)
    return chain.rollout(ctx, gen)
