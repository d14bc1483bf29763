"""Baselines for likelihood-ratio terms (docs/method.md section 2): what R is compared with.

A likelihood-ratio term for step k of row b is (R_b - beta_{k,b}) grad log p(x_{k-1} | x_k). It
stays unbiased for any beta that does not depend on that step's own noise eps_k, because
E[grad log p(x_{k-1} | x_k) | x_k] = 0. Three choices:

    "loo"        beta = mean R of the other rows                  (independent of row b)
    "state"      beta = T_{k,b} = R(x0_hat(mu_k))                  (a function of x_k only)
    "state+loo"  beta = T_{k,b} + mean over the other rows of (R - T)

mu_k = mu_theta(x_k, k, c) is the noise-free next state, and x0_hat the model's own prediction of
x_0 from it (at the input of step k-1; at k = 1, mu_1 is x_0 itself). T costs one forward pass per
(k, row), no backward. Late in the chain T tracks R closely and removes most of the variance the
leave-one-out mean leaves; early on x0_hat is a blur and T is poor, which "state+loo" corrects on
average by the residual of the other rows.
"""

from __future__ import annotations

from typing import Literal

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.sampler import Trajectory

Baseline = Literal["loo", "state", "state+loo"]
BASELINES: tuple[str, ...] = ("loo", "state", "state+loo")


def leave_one_out(rewards: torch.Tensor, peers: torch.Tensor | None = None) -> torch.Tensor:
    """Advantages R_b - b_b with b_b the mean reward of the *other* samples of the batch, or, with
    ``peers`` (a group id per row: prompt groups), of the other samples of row b's group.

    b_b does not depend on sample b, so every likelihood-ratio term stays unbiased."""
    R = rewards.detach()
    if peers is not None:
        return R - mean_of_others(R, peers)
    B = len(R)
    if B < 2:
        return R - R  # no other sample: no baseline possible, and no signal either; use batch >= 2
    return R - (R.sum() - R) / (B - 1)


def mean_of_others(values: torch.Tensor, groups: torch.Tensor, alone: float | None = None) -> torch.Tensor:
    """For each entry, the mean of the *other* entries with the same group id. An entry alone in
    its group gets ``alone``, or itself when None (its advantage is then 0: no signal rather than
    a biased one)."""
    _, index = torch.unique(groups, return_inverse=True)
    n = int(index.max()) + 1 if len(index) else 0
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index.to(values.device), values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(
        0, index.to(values.device), torch.ones_like(values))
    others = counts[index] - 1
    fallback = values if alone is None else torch.full_like(values, alone)
    return torch.where(others > 0, (sums[index] - values) / others.clamp(min=1), fallback)


def noise_free_next(traj: Trajectory, ks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """mu_k, the next state without step k's noise: what a baseline for step k may look at, and
    where the Taylor control variate linearises (a function of x_k only)."""
    return traj.mean[ks, rows]


def surrogate(chain: Chain, x: torch.Tensor, k: torch.Tensor, ctx: ChainContext) -> torch.Tensor:
    """S_k(x) = R(x0_hat(x, k-1)) per row (k = 1: R(x), x is already x_0); differentiable in x."""
    x0 = x.clone()
    later = (k > 1).nonzero().flatten()
    if len(later):
        x0[later] = chain.denoised(x[later], k[later] - 1, ctx.take(later)).to(x0)
    return chain.reward(x0, ctx)


@torch.no_grad()
def state_values(chain: Chain, ctx: ChainContext, traj: Trajectory, ks: torch.Tensor, rows: torch.Tensor,
                 chunk: int) -> torch.Tensor:
    """T_{k,b} = R(x0_hat(mu_k)) for each (k, row) pair, in chunks of pairs per denoiser call."""
    if len(ks) == 0:  # no likelihood-ratio pair (e.g. the FO tail and the block cover the chain)
        return torch.zeros(0, dtype=traj.x.dtype, device=traj.x.device)
    out = []
    for start in range(0, len(ks), chunk):
        k, r = ks[start:start + chunk], rows[start:start + chunk]
        out.append(surrogate(chain, noise_free_next(traj, k, r), k, ctx.take(r)).detach())
    return torch.cat(out)


def advantages(R: torch.Tensor, rows: torch.Tensor, baseline: Baseline, values: torch.Tensor | None = None,
               groups: torch.Tensor | None = None, peers: torch.Tensor | None = None) -> torch.Tensor:
    """R_b - beta for each pair (row ``rows[i]``); ``values`` the state values T of the pairs.

    "state+loo" subtracts the mean residual R - T of the other pairs of the same group (pairs of
    one step k: different rows, so none shares row b's noise). With ``peers`` (a prompt-group id
    per row), every leave-one-out mean is taken over the other rows of the same prompt group."""
    R = R.detach()
    if baseline == "loo":
        return leave_one_out(R, peers)[rows]
    if values is None:
        raise ValueError(f"baseline {baseline!r} needs the state values T")
    residual = R[rows] - values.to(R)
    if baseline == "state":
        return residual
    if baseline != "state+loo":
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    groups = torch.zeros_like(rows) if groups is None else groups
    if peers is not None:  # same step and same prompt group
        groups = groups * (int(peers.max()) + 1) + peers[rows]
    return residual - mean_of_others(residual, groups, alone=0.0)
