"""The chain abstraction every estimator is written against (method doc section 1).

A chain is a stochastic sampler x_{k-1} = mu_theta(x_k, k, c) + sigma_k eps_k, k = K..1, plus a
reward on x_0. The same estimator code runs on the UNet backends
(:class:`rlr_core.estimators.backend_chain.BackendChain`) and on the linear-Gaussian test bed
(:class:`rlr_core.estimators.toy_chain.ToyChain`), so the analytic tests test the real estimators.
"""

from __future__ import annotations

import abc
from typing import Protocol

import torch

from rlr_core.rollout import Prediction, StepIndex, Trajectory, rollout


class ChainContext(Protocol):
    """What one batch is conditioned on (prompts, conditioning); rows can be selected."""

    @property
    def batch(self) -> int: ...

    def take(self, rows: torch.Tensor) -> ChainContext: ...


class Chain(abc.ABC):
    sigma: torch.Tensor  # (K+1,): sigma[k] of step k, entry 0 unused

    @property
    def num_steps(self) -> int:
        return len(self.sigma) - 1

    @abc.abstractmethod
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters theta (LoRA adapters or all weights)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    @abc.abstractmethod
    def initial(self, ctx: ChainContext, generator: torch.Generator) -> torch.Tensor:
        """x_K for each row of ``ctx``."""

    @abc.abstractmethod
    def mean(self, x: torch.Tensor, k: StepIndex, ctx: ChainContext) -> torch.Tensor:
        """mu_theta(x_k, k, c), differentiable in theta; ``k`` an int or a per-row (N,) tensor."""

    @abc.abstractmethod
    def perturbed_mean(self, x: torch.Tensor, k: int, ctx: ChainContext,
                       deltas: list[torch.Tensor]) -> torch.Tensor:
        """mu_{theta + delta_b}(x_k, k, c) with row b's own perturbation deltas[i][b] of parameter i
        (the ZO term, method doc section 2). No gradient."""

    @abc.abstractmethod
    def reward(self, x0: torch.Tensor, ctx: ChainContext) -> torch.Tensor:
        """R(x_0) per row, differentiable in x_0 (for latent models: R(decode(x_0)))."""

    def denoised(self, x: torch.Tensor, k: StepIndex, ctx: ChainContext) -> torch.Tensor:
        """The model's own prediction of x_0 (Tweedie) from a state x at the input of step k >= 1;
        ``k`` an int or a per-row tensor. Only state-dependent baselines need it."""
        raise NotImplementedError(f"{type(self).__name__} cannot predict x_0 (state baselines need it)")

    def reference_mean(self, x: torch.Tensor, k: StepIndex, ctx: ChainContext) -> torch.Tensor:
        """mu_ref(x_k, k, c) of the frozen reference model (no gradient): the round's parent, or
        the base model when none was set. Only the KL regulariser needs it (rlr_core/estimators/kl.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference model (kl_coef > 0 needs one)")

    # --- derived operations shared by every chain -------------------------------------------

    @torch.no_grad()
    def rollout(self, ctx: ChainContext, generator: torch.Generator, until: int = 0,
                perturb: ZOPerturbation | None = None, x_K: torch.Tensor | None = None) -> Trajectory:
        """Sample x_K .. x_until without a graph (the one loop, :func:`rlr_core.rollout.rollout`),
        recording every state, noise, mean and log p(x_{k-1} | x_k).

        With ``perturb``, row b uses theta + delta_{b,k} at the steps perturb marks for it; with
        ``x_K``, the chain starts there instead of drawing fresh initial noise (prompt groups)."""

        def predict(x: torch.Tensor, k: StepIndex) -> Prediction:
            if perturb is not None and bool(perturb.active[k].any()):
                return Prediction(self.perturbed_mean(x, k, ctx, perturb.deltas(k)))
            return Prediction(self.mean(x, k, ctx))

        x_K = self.initial(ctx, generator) if x_K is None else x_K
        run = rollout(predict, x_K, self.sigma, generator, start=self.num_steps, steps=self.num_steps - until,
                      record=True)
        return run.trajectory


class ZOPerturbation:
    """Seed-replayable parameter perturbations delta_{b,k} ~ N(0, s^2 I) (method doc section 2, ZO).

    Row b is perturbed at step k where ``active[k, b]``; the deltas of step k are regenerated from
    (seed, k) on demand, so nothing is stored between sampling and the gradient estimate."""

    def __init__(self, chain: Chain, active: torch.Tensor, scale: float, seed: int):
        self.shapes = [(p.shape, p.dtype) for p in chain.parameters()]
        self.device = chain.parameters()[0].device
        self.active = active  # (K+1, B) bool
        self.scale = scale
        self.seed = seed

    def deltas(self, k: int) -> list[torch.Tensor]:
        """delta_{b,k} for every row b, zero where row b is not perturbed at step k."""
        gen = torch.Generator("cpu").manual_seed(self.seed * 100_003 + k)
        mask = self.active[k].float()
        B = len(mask)
        return [(torch.randn((B, *shape), generator=gen, dtype=dtype) * self.scale
                 * mask.to(dtype).reshape(-1, *[1] * len(shape))).to(self.device) for shape, dtype in self.shapes]
