"""The linear-Gaussian toy chain on a flow model's sampler (method doc section 10).

The data x_0 ~ N(theta, s^2 I) under the rectified flow x_t = (1 - t) x_0 + t eps has the exact
velocity v(x_t, t) = (x_t - E[x_0 | x_t]) / t, with

    E[x_0 | x_t] = theta + w_t (x_t - (1 - t) theta),   w_t = (1 - t) s^2 / ((1 - t)^2 s^2 + t^2)

and its marginals are p_t = N((1 - t) theta, ((1 - t)^2 s^2 + t^2) I). The chain is the flow
sampler (:mod:`rlr_core.flow`: the reverse SDE, or the ODE at noise level 0) run with that
velocity; each step's mean is linear in x_k and theta, so :class:`ToyChain`'s closed-form
gradient applies unchanged, and the marginals of both samplers can be computed exactly.
"""

from __future__ import annotations

import torch

from rlr_core.estimators.toy_chain import ToyChain
from rlr_core.flow import FlowSchedule, flow_step, uniform_flow_schedule
from rlr_core.rollout import StepIndex


class FlowToyChain(ToyChain):
    def __init__(self, dim: int = 16, steps: int = 10, data_std: float = 0.5, seed: int = 0,
                 noise_level: float = 0.7, schedule: FlowSchedule | None = None):
        super().__init__(dim=dim, steps=steps, data_std=data_std, seed=seed,
                         schedule=schedule or uniform_flow_schedule(steps, noise_level))

    def _t(self, k: StepIndex) -> torch.Tensor:
        t = self.schedule.t[k].double()
        return t.reshape(-1, 1) if t.ndim else t

    def _x0_hat(self, x: torch.Tensor, theta: torch.Tensor, k: StepIndex) -> torch.Tensor:
        t, s2 = self._t(k), self.data_std**2
        w = (1 - t) * s2 / ((1 - t) ** 2 * s2 + t**2)
        return theta + w * (x - (1 - t) * theta)

    def _mean(self, x: torch.Tensor, theta: torch.Tensor, k: StepIndex) -> torch.Tensor:
        s = self.schedule
        velocity = (x - self._x0_hat(x, theta, k)) / self._t(k)
        return flow_step(velocity, x, s.t[k].double(), s.t_prev[k].double(), s.noise_coef[k].double()).mean

    def marginal(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-coordinate variance of the true p_t."""
        theta = self.theta.detach()
        return (1 - t) * theta, torch.full_like(theta, (1 - t) ** 2 * self.data_std**2 + t**2)

    @torch.no_grad()
    def chain_marginals(self, x_mean: torch.Tensor, x_var: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The exact mean and variance of x_k, k = K .. 0, of the sampled chain from x_K with the
        given moments: x_{k-1} = a_k x_k + c_k theta + sigma_k eps_k is linear (entry i is x_{K-i})."""
        out = [(x_mean, x_var)]
        for k in range(self.num_steps, 0, -1):
            x_mean = self.a[k] * x_mean + self.c[k] * self.theta.detach()
            x_var = self.a[k] ** 2 * x_var + self.sigma[k] ** 2
            out.append((x_mean, x_var))
        return out
