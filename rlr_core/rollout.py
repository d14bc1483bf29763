"""The one sampling loop: x_{k-1} = mu(x_k, k) + sigma_k eps_k for k = start, start-1, ...

Generation (:func:`rlr_core.sampler.sample`), the DCoT previews (:func:`rlr_core.sampler.sample_prompts`),
the estimators' rollouts (:meth:`rlr_core.estimators.chain.Chain.rollout`) and their pathwise
re-runs with a graph (:func:`rlr_core.estimators.common.pathwise`, RLR's HO block) all run
:func:`rollout`. What differs between them plugs in here:

- ``predict(x, k)``, the model: it returns the step's mean (and, where it has one, the
  prediction of x_0). Per-step conditioning (DCoT) is a :class:`rlr_core.sampler.Conditioning`
  read at step k inside it, and ZO perturbations are a ``predict`` that uses perturbed weights
  at the steps they mark (``Chain.rollout``).
- ``noise``: a generator (fresh draws, in the order of the plain diffusers loop: one per step,
  also where sigma_k = 0, so the same seed gives the same images) or a recorded noise table to
  replay a trajectory.
- ``record=True`` records the trajectory; ``on_step`` hooks see every :class:`Step` (the prompt
  lab captures intermediate predictions of the image with one).

The loop adds no ``torch.no_grad``: callers that sample for a record wrap it, pathwise callers
keep the graph. Step numbering k = K .. 1 as in docs/method.md section 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

StepIndex = int | torch.Tensor  # one step k for the whole batch, or a (B,) tensor of per-sample k


class Prediction(NamedTuple):
    """What the model gives for one step: the mean mu(x_k, k), and its prediction of x_0 if known."""

    mean: torch.Tensor
    x0: torch.Tensor | None = None


@dataclass
class Step:
    """One step as a hook sees it: x_{k-1} = prediction.mean + sigma_k * noise."""

    k: StepIndex
    x: torch.Tensor  # x_k
    prediction: Prediction
    noise: torch.Tensor  # eps_k
    x_prev: torch.Tensor  # x_{k-1}


Predict = Callable[[torch.Tensor, StepIndex], Prediction]
StepHook = Callable[[Step], None]


@dataclass
class Trajectory:
    """A recorded chain, indexed by step number k (entry 0 unused where it has no meaning).

    x[k] = x_k for k = 0..K; noise[k] = eps_k, mean[k] = mu_theta(x_k, k, c), log_prob[k] =
    log p(x_{k-1} | x_k) for k = 1..K (0 at deterministic steps, where sigma_k = 0); sigma[k].
    Steps the rollout did not run (below its ``stop``) are zeros."""

    x: torch.Tensor  # (K+1, B, *state)
    noise: torch.Tensor  # (K+1, B, *state)
    mean: torch.Tensor  # (K+1, B, *state)
    log_prob: torch.Tensor  # (K+1, B)
    sigma: torch.Tensor  # (K+1,)

    @property
    def num_steps(self) -> int:
        return len(self.sigma) - 1

    @property
    def x0(self) -> torch.Tensor:
        return self.x[0]


@dataclass
class Rollout:
    x: torch.Tensor  # the last state reached (x_0 when run to the end)
    trajectory: Trajectory | None


def draw_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the generator's device (CPU) and moved, like the plain diffusers loop: same seeds,
    # same images on every device.
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """log N(x_prev; mean, sigma^2 I) per sample (B,), constants included (method doc section 1).

    ``sigma`` is a scalar or a (B,) tensor of per-sample noise scales."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    sigma = sigma.expand(len(mean)) if sigma.ndim == 0 else sigma
    sq = ((x_prev - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * sigma**2) - mean[0].numel() * (sigma.log() + 0.5 * math.log(2 * math.pi))


class _Recorder:
    """Fills a :class:`Trajectory` of K+1 entries as the steps go by."""

    def __init__(self, x_start: torch.Tensor, k_start: int, sigma: torch.Tensor):
        K = len(sigma) - 1
        self.sigma = sigma
        self.x = torch.zeros((K + 1, *x_start.shape), dtype=x_start.dtype, device=x_start.device)
        self.noise, self.mean = torch.zeros_like(self.x), torch.zeros_like(self.x)
        self.log_prob = torch.zeros((K + 1, len(x_start)), dtype=x_start.dtype, device=x_start.device)
        self.x[k_start] = x_start

    def __call__(self, step: Step) -> None:
        k, mu = int(step.k), step.prediction.mean
        self.x[k - 1], self.noise[k], self.mean[k] = step.x_prev, step.noise, mu
        if self.sigma[k] > 0:
            self.log_prob[k] = gaussian_log_prob(step.x_prev, mu, self.sigma[k])

    def trajectory(self) -> Trajectory:
        return Trajectory(x=self.x, noise=self.noise, mean=self.mean, log_prob=self.log_prob,
                          sigma=self.sigma.clone())


def rollout(predict: Predict, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Generator | torch.Tensor,
            start: StepIndex, steps: int | None = None, record: bool = False,
            on_step: Sequence[StepHook] = ()) -> Rollout:
    """Run ``steps`` steps from x_start (default: down to x_0), k = start, start - 1, ...

    ``start`` may be a (B,) tensor (each row its own k, as in RLR's HO block; then ``steps`` is
    required and ``record`` unsupported). ``noise`` is a generator or a (K+1, B, *state) table
    (entry k = eps_k). ``sigma`` is the (K+1,) table of sigma_k."""
    per_row = isinstance(start, torch.Tensor) and start.ndim == 1
    if steps is None:
        if per_row:
            raise ValueError("give the number of steps when every row starts at its own step")
        steps = int(start)
    rows = torch.arange(len(x)) if per_row else None
    hooks = list(on_step)
    if record:
        if per_row:
            raise ValueError("a trajectory record needs one step k for the whole batch")
        recorder = _Recorder(x, int(start), sigma)
        hooks.insert(0, recorder)
    for u in range(steps):
        k = start - u
        pred = predict(x, k)
        if isinstance(noise, torch.Generator):
            eps = draw_noise(x, noise)
        else:
            eps = noise[k, rows] if per_row else noise[k]
        s = sigma[k].to(x)
        if per_row:
            s = s.reshape(-1, *[1] * (x.ndim - 1))
        x_prev = pred.mean + s * eps
        if hooks:
            step = Step(k, x, pred, eps, x_prev)
            for hook in hooks:
                hook(step)
        x = x_prev
    return Rollout(x, recorder.trajectory() if record else None)
