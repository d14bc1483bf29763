"""The first-order (Taylor, MuProp-style) control variate on likelihood-ratio terms
(docs/method.md section 2, "The Taylor control variate").

For step k of row b, with x_{k-1} = mu_k + sigma_k eps_k and the surrogate

    S_k(x) = R(x0_hat(x, k-1))        (k = 1: S_1(x) = R(x); the state baseline's T = S_k(mu_k))

linearised at the noise-free next state mu_k (a function of x_k only, no eps_k):

    S_k(x_{k-1}) ~ S_k(mu_k) + <a_k, x_{k-1} - mu_k>,      a_k = grad_x S_k(mu_k)

the likelihood-ratio term (R - beta) grad log p(x_{k-1} | x_k) becomes

    (R - beta - <a_k, x_{k-1} - mu_k>) grad log p(x_{k-1} | x_k)  +  (d mu_theta/d theta)^T a_k

The second part is the exact expectation of what was subtracted:
E[<a_k, sigma_k eps_k> (d mu/d theta)^T eps_k / sigma_k | x_k] = (d mu/d theta)^T a_k, the pathwise
gradient of the linear term. So the term stays unbiased for any a_k that does not depend on eps_k,
however poor the surrogate; a good one removes the part of R that is linear in the step's noise.
a_k costs one denoiser forward and backward (through the reward, to the input x) per (k, row).
"""

from __future__ import annotations

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.rollout import Trajectory


def linearisation_point(traj: Trajectory, ks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Where S_k is linearised: mu_k, the next state without step k's noise."""
    return traj.mean[ks, rows]


def surrogate_and_slope(chain: Chain, ctx: ChainContext, traj: Trajectory, ks: torch.Tensor, rows: torch.Tensor,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_k(mu_k), a_k = grad_x S_k(mu_k)) for each (k, row) pair: (P,) and (P, *state).

    Only the input x is differentiated (torch.autograd.grad), so no parameter's .grad changes."""
    values, slopes = [], []
    for start in range(0, len(ks), chunk):
        k, r = ks[start:start + chunk], rows[start:start + chunk]
        sub = ctx.take(r)
        with torch.enable_grad():
            x = linearisation_point(traj, k, r).detach().clone().requires_grad_(True)
            later = (k > 1).nonzero().flatten()
            x0 = x.clone()
            if len(later):
                x0[later] = chain.denoised(x[later], k[later] - 1, sub.take(later)).to(x0)
            S = chain.reward(x0, sub)
            (a,) = torch.autograd.grad(S.sum(), x)
        values.append(S.detach())
        slopes.append(a.detach())
    if not values:
        empty = traj.x.new_zeros((0, *traj.x.shape[2:]))
        return empty.new_zeros(0), empty
    return torch.cat(values), torch.cat(slopes)


def linear_term(slopes: torch.Tensor, x_next: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """<a_k, x_{k-1} - mu_k> per pair (or per branch: x_next (M, P, *state) gives (M, P))."""
    return (slopes.to(x_next) * (x_next - point.to(x_next))).flatten(-slopes.ndim + 1).sum(-1)
