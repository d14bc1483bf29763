"""The flow-matching sampler's step table: the model's Euler ODE and Flow-GRPO's reverse SDE.

Flow models (Stable Diffusion 3 / 3.5, FLUX.1; diffusers' ``FlowMatchEulerDiscreteScheduler``)
use the rectified-flow convention x_t = (1 - t) x_0 + t eps, t in [0, 1] (the scheduler's
"sigma"), and predict the velocity v = eps - x_0. Their usual sampler is the Euler ODE
x_{t'} = x_t + (t' - t) v, which has no per-step likelihood. The estimators' likelihood-ratio
terms need a Gaussian step, so rounds train on the reverse SDE with the same marginals that
Flow-GRPO publishes (Liu et al. 2025, arXiv:2505.05470, eq. 9 and their released
``sde_step_with_logprob``):

    dx_t = [v(x_t, t) + s_t^2 / (2t) (x_t + (1 - t) v(x_t, t))] dt + s_t dW,   s_t = a sqrt(t / (1 - t))

(t runs from 1 to 0; a is the noise level, 0.7 in their paper). Its Euler-Maruyama step from t to
t' < t, dt = t - t', is Gaussian:

    x_{t'} = x_t - [v + s_t^2 / (2t) (x_t + (1 - t) v)] dt + s_t sqrt(dt) eps

a mean that is differentiable in theta and a fixed std s_t sqrt(dt): the DDIM step's shape, so
every estimator runs unchanged (method doc section 10). At t = 1 the coefficient s_t is
infinite; as Flow-GRPO does, its 1 - t is replaced by 1 - t_2, the schedule's second value.
With a = 0 the step is the scheduler's own Euler step (``FlowMatchEulerDiscreteScheduler.step``).

Numbering as in :mod:`rlr_core.sampler`: step k = K .. 1 maps x_k (at t_k) to x_{k-1} (at
t_{k-1}); every table has K+1 entries, entry 0 unused.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rlr_core.rollout import Prediction, StepIndex

__all__ = ["FlowSchedule", "flow_step", "make_flow_schedule", "sde_noise_coefficient", "uniform_flow_schedule"]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = v.to(like.device, like.dtype)
    return v.reshape(-1, *[1] * (like.ndim - 1)) if v.ndim == 1 else v


def sde_noise_coefficient(t: torch.Tensor, noise_level: float, t_max: float) -> torch.Tensor:
    """s_t = a sqrt(t / (1 - t)), with 1 - t at t = 1 replaced by 1 - t_max (Flow-GRPO's clamp)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    denom = 1 - torch.where(t >= 1, torch.full_like(t, t_max), t)
    return noise_level * (t / denom).sqrt()


def flow_step(velocity: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              noise_coef: torch.Tensor) -> Prediction:
    """The mean of one reverse-SDE step from t to t_prev (module docstring), differentiable, with
    the predicted x_0 = x_t - t v. ``noise_coef`` is s_t; 0 gives the Euler ODE step exactly as
    ``FlowMatchEulerDiscreteScheduler.step`` computes it. Coefficients are scalars or per sample."""
    t, t_prev, s = (_per_sample(torch.as_tensor(c), sample) for c in (t, t_prev, noise_coef))
    x0 = sample - t * velocity
    mean = sample + (t_prev - t) * velocity
    if bool((s > 0).any()):
        mean = mean - (s**2 / (2 * t)) * (t - t_prev) * (sample + (1 - t) * velocity)
    return Prediction(mean, x0)


@dataclass(frozen=True)
class FlowSchedule:
    """The flow sampler's coefficients of each step k = 1..K (entry 0 unused; K+1 entries each).

    Duck-types :class:`rlr_core.sampler.StepSchedule` where the sampler and the estimators read it:
    ``timesteps`` (what the model is called with), ``sigma`` (the step's std), ``num_steps`` and
    :meth:`from_output`."""

    timesteps: torch.Tensor  # float: the model's timestep at step k (t_k * num_train_timesteps)
    t: torch.Tensor  # t_k, the flow time of x_k
    t_prev: torch.Tensor  # t_{k-1}, the step's target time (0 at k = 1)
    noise_coef: torch.Tensor  # s_{t_k} (0: the ODE)
    sigma: torch.Tensor  # the step's std s_{t_k} sqrt(t_k - t_{k-1}) (0: the ODE)
    noise_level: float  # a

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def from_output(self, model_output: torch.Tensor, sample: torch.Tensor, k: StepIndex) -> Prediction:
        """mu(x_k, k) and the predicted x_0 from the velocity ``model_output`` (k an int or a CPU (B,) tensor)."""
        return flow_step(model_output, sample, self.t[k], self.t_prev[k], self.noise_coef[k])


_SCHEDULES: OrderedDict[tuple, FlowSchedule] = OrderedDict()
_LOCK = threading.Lock()
_MAX = 64


def make_flow_schedule(scheduler, steps: int, noise_level: float, sigmas: Sequence[float] | None = None,
                       mu: float | None = None) -> FlowSchedule:
    """The step table of a ``FlowMatchEulerDiscreteScheduler`` for ``steps`` steps, with the
    sigmas the pipeline passes to ``set_timesteps`` (``sigmas``, ``mu``: FLUX passes both).

    ``noise_level`` a = 0 is the ODE. The scheduler is left untouched (a private copy is set)."""
    if noise_level < 0:
        raise ValueError(f"the noise level must be >= 0, got {noise_level}")
    if steps < 2:
        raise ValueError("the flow sampler needs at least 2 steps")
    key = (json.dumps(dict(scheduler.config), sort_keys=True, default=str), int(steps), float(noise_level),
           None if sigmas is None else tuple(float(s) for s in sigmas), None if mu is None else float(mu))
    with _LOCK:
        if key in _SCHEDULES:
            _SCHEDULES.move_to_end(key)
            return _SCHEDULES[key]
    scheduler_copy = type(scheduler).from_config(scheduler.config)
    kwargs = {}
    if sigmas is not None:
        kwargs["sigmas"] = np.asarray(sigmas, dtype=np.float64)
    if mu is not None:
        kwargs["mu"] = mu
    scheduler_copy.set_timesteps(None if sigmas is not None else int(steps), **kwargs)
    ts = scheduler_copy.timesteps.float().cpu()  # sampling order: ts[0] is step K
    sig = scheduler_copy.sigmas.float().cpu()  # K + 1 values, the last the terminal 0
    if len(ts) != steps:
        raise ValueError(f"the scheduler made {len(ts)} steps, not {steps}")
    t, t_prev = sig[:-1], sig[1:]
    coef = sde_noise_coefficient(t.double(), float(noise_level), float(sig[1])).float()
    std = coef * (t - t_prev).clamp(min=0).sqrt()

    def by_k(v: torch.Tensor) -> torch.Tensor:  # sampling order -> entry k, entry 0 unused
        return torch.cat([torch.zeros_like(v[:1]), v.flip(0)])

    schedule = FlowSchedule(timesteps=by_k(ts), t=by_k(t), t_prev=by_k(t_prev), noise_coef=by_k(coef),
                            sigma=by_k(std), noise_level=float(noise_level))
    with _LOCK:
        _SCHEDULES[key] = schedule
        while len(_SCHEDULES) > _MAX:
            _SCHEDULES.popitem(last=False)
    return schedule


def uniform_flow_schedule(steps: int, noise_level: float, t_start: float = 1.0) -> FlowSchedule:
    """A schedule on evenly spaced times t_start = t_K > ... > t_1 > t_0 = 0, without a scheduler
    (timesteps t * 1000): the Gaussian toys' chain. ``t_start`` < 1 starts the chain inside the flow."""
    grid = torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)
    t, t_prev = grid[:-1], grid[1:]
    coef = sde_noise_coefficient(t, float(noise_level), float(grid[1]))
    std = coef * (t - t_prev).sqrt()

    def by_k(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(v[:1]), v.flip(0)])

    return FlowSchedule(timesteps=by_k(t * 1000).float(), t=by_k(t), t_prev=by_k(t_prev), noise_coef=by_k(coef),
                        sigma=by_k(std), noise_level=float(noise_level))
