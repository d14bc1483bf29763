"""A linear-Gaussian "diffusion" chain with a quadratic reward: the exact gradient in closed form.

The chain is the DDIM sampler (eta = 1) run with the exact denoiser of data x_0 ~ N(theta, s^2 I):

    x_hat_0(x_k) = E[x_0 | x_k] = theta + w_k (x_k - sqrt(abar_k) theta)
    w_k          = sqrt(abar_k) s^2 / (abar_k s^2 + 1 - abar_k)
    x_{k-1}      = ddim_mean(x_hat_0, x_k) + sigma_k eps_k  =  a_k x_k + c_k theta + sigma_k eps_k

so theta enters every step's mean (shared, like a UNet's weights), and x_0 is linear in theta and
the noise. With the reward R(x_0) = -1/2 sum_i w_i (x_0,i - y_i)^2:

    x_0 = (prod_k a_k) x_K + sum_k P_k (c_k theta + sigma_k eps_k),   P_k = a_1 a_2 ... a_{k-1}
    J(theta) = E R = -1/2 sum_i w_i ((N theta_i - y_i)^2 + Var x_0,i),   N = sum_k P_k c_k
    dJ/dtheta (credited to step k) = -w P_k c_k (N theta - y)

The default schedule is the method doc's: 20 DDIM steps of a linear beta schedule, sigma 0.78 at
the start, 0.15 and 0.01 at the last two stochastic steps, 0 at the final one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from rlr_core.estimators.chain import Chain
from rlr_core.sampler import StepIndex, StepSchedule, ddim_mean, make_schedule


@dataclass
class ToyContext:
    batch: int

    def take(self, rows: torch.Tensor) -> ToyContext:
        return ToyContext(len(rows))


def doc_schedule(steps: int = 20) -> StepSchedule:
    """The method doc's toy schedule: DDIM eta 1 over a linear beta schedule, final sigma 0."""
    scheduler = DDIMScheduler(beta_schedule="linear", set_alpha_to_one=True, timestep_spacing="leading",
                              clip_sample=False, prediction_type="sample")
    return make_schedule(scheduler, steps, eta=1.0)


class ToyChain(Chain):
    def __init__(self, dim: int = 16, steps: int = 20, data_std: float = 0.5, seed: int = 0,
                 schedule: StepSchedule | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.schedule = schedule or doc_schedule(steps)
        self.sigma = self.schedule.sigma.double()
        self.data_std = data_std
        self.theta = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.reference_theta = self.theta.detach().clone()  # the frozen reference model (the KL regulariser's)
        self.target = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.weights = torch.linspace(0.5, 1.5, dim, dtype=torch.float64)
        # a_k, c_k by linearity of the step mean: mean(x, theta) = a x + c theta.
        one = torch.ones(1, 1, dtype=torch.float64)
        ks = range(1, self.num_steps + 1)
        self.a = torch.tensor([0.0] + [float(self._mean(one, 0 * one, k)) for k in ks], dtype=torch.float64)
        self.c = torch.tensor([0.0] + [float(self._mean(0 * one, one, k)) for k in ks], dtype=torch.float64)

    def _x0_hat(self, x: torch.Tensor, theta: torch.Tensor, k: StepIndex) -> torch.Tensor:
        abar = self.schedule.alpha_prod[k].double()
        abar = abar.reshape(-1, 1) if abar.ndim else abar
        w = abar.sqrt() * self.data_std**2 / (abar * self.data_std**2 + 1 - abar)
        return theta + w * (x - abar.sqrt() * theta)

    def _mean(self, x: torch.Tensor, theta: torch.Tensor, k: StepIndex) -> torch.Tensor:
        s = self.schedule
        return ddim_mean(self._x0_hat(x, theta, k), x, s.alpha_prod[k].double(), s.alpha_prod_prev[k].double(),
                         s.sigma[k].double(), "sample", None)

    # --- the Chain interface ----------------------------------------------------------------

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [("theta", self.theta)]

    def initial(self, ctx: ToyContext, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((ctx.batch, len(self.theta)), generator=generator, dtype=torch.float64)

    def mean(self, x: torch.Tensor, k: StepIndex, ctx: ToyContext) -> torch.Tensor:
        return self._mean(x, self.theta, k)

    def denoised(self, x: torch.Tensor, k: StepIndex, ctx: ToyContext) -> torch.Tensor:
        return self._x0_hat(x, self.theta, k)

    @torch.no_grad()
    def reference_mean(self, x: torch.Tensor, k: StepIndex, ctx: ToyContext) -> torch.Tensor:
        return self._mean(x, self.reference_theta, k)

    @torch.no_grad()
    def perturbed_mean(self, x: torch.Tensor, k: int, ctx: ToyContext, deltas: list[torch.Tensor]) -> torch.Tensor:
        return self._mean(x, self.theta + deltas[0], k)

    def reward(self, x0: torch.Tensor, ctx: ToyContext) -> torch.Tensor:
        return -0.5 * (self.weights * (x0 - self.target) ** 2).sum(-1)

    # --- the exact answers ------------------------------------------------------------------

    def step_credit(self) -> torch.Tensor:
        """P_k c_k for k = 0..K (entry 0 unused): how much of E[x_0] step k's theta contributes."""
        credit = torch.zeros(self.num_steps + 1, dtype=torch.float64)
        P = 1.0
        for k in range(1, self.num_steps + 1):
            credit[k] = P * self.c[k]
            P = P * self.a[k]
        return credit

    @torch.no_grad()
    def exact_grad(self, steps: Iterable[int] | None = None) -> torch.Tensor:
        """dJ/dtheta, or only the part credited to ``steps`` (e.g. what truncated BP estimates)."""
        credit = self.step_credit()
        N = credit.sum()
        part = N if steps is None else sum(credit[k] for k in steps)
        return -self.weights * part * (N * self.theta - self.target)
