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

from rlr_core.estimators.baselines import Baseline, advantages, noise_free_next, state_values, surrogate
from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.rollout import Trajectory


def surrogate_and_slope(chain: Chain, ctx: ChainContext, traj: Trajectory, ks: torch.Tensor, rows: torch.Tensor,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_k(mu_k), a_k = grad_x S_k(mu_k)) for each (k, row) pair: (P,) and (P, *state).

    Only the input x is differentiated (torch.autograd.grad), so no parameter's .grad changes."""
    values, slopes = [], []
    for start in range(0, len(ks), chunk):
        k, r = ks[start:start + chunk], rows[start:start + chunk]
        with torch.enable_grad():
            x = noise_free_next(traj, k, r).detach().clone().requires_grad_(True)
            S = surrogate(chain, x, k, ctx.take(r))
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


def taylor_advantages(A: torch.Tensor, slopes: torch.Tensor, x_next: torch.Tensor, traj: Trajectory,
                      ks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """R - beta - <a_k, x_{k-1} - mu_k>: the advantages with the linear term taken out (per pair, or
    per branch end when ``x_next`` is (M, P, *state)); its expectation comes back through ``slopes``
    in the backward (``lr_backward``, ``RLR.ho_backward``)."""
    return A - linear_term(slopes, x_next, noise_free_next(traj, ks, rows))


def pair_advantages(chain: Chain, ctx: ChainContext, traj: Trajectory, R: torch.Tensor, ks: torch.Tensor,
                    rows: torch.Tensor, baseline: Baseline, control_variate: str, chunk: int,
                    groups: torch.Tensor | None = None,
                    peers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """R - beta for the likelihood-ratio pairs (ks[i], rows[i]) and, with ``control_variate`` "taylor",
    their slopes a_k (else None). S_k(mu_k) is the state value T too: one pass gives both."""
    values = slopes = None
    if control_variate == "taylor":
        values, slopes = surrogate_and_slope(chain, ctx, traj, ks, rows, chunk)
    elif control_variate != "none":
        raise ValueError(f"unknown control variate {control_variate!r}; choose 'none' or 'taylor'")
    elif baseline != "loo":
        values = state_values(chain, ctx, traj, ks, rows, chunk)
    return advantages(R, rows, baseline, values, groups=groups, peers=peers), slopes
