"""The stochastic DDIM sampler over the backend interface, with an optional trajectory record.

The steps themselves run in :func:`rlr_core.rollout.rollout`, the project's one sampling loop;
this module supplies the DDIM step table, the step's mean and the conditioning.

Numbering follows docs/method.md section 1: the chain runs steps k = K .. 1, step k maps
x_k to x_{k-1} = mu_theta(x_k, k, c) + sigma_k * eps_k; x_K is pure noise, x_0 the output.
Every per-step table here (timesteps, alphas, sigma, the recorded trajectory) is indexed by
that k, with entry 0 unused, so code reads like the formulas.

DDPM: DDIM with eta = 1 has exactly the DDPM ancestral step's mean and variance over the same
timesteps (Song et al. 2021, eq. 16), so ``eta=1`` is the DDPM sampler; eta in [0, 1]
interpolates to deterministic DDIM.

The step math is our own (not ``DDIMScheduler.step``) because the estimators need per-sample
timesteps and a differentiable mean; tests check it against ``DDIMScheduler.step``.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from rlr_core.backends.base import DiffusionBackend
from rlr_core.flow import FlowSchedule
from rlr_core.rollout import (
    Prediction,
    Step,
    StepIndex,
    Trajectory,
    draw_noise,
    gaussian_log_prob,
    rollout,
)

__all__ = [  # Trajectory, draw_noise, gaussian_log_prob, StepIndex: re-exported from rlr_core.rollout
    "Conditioning", "Prediction", "SampleResult", "SamplerSettings", "StepIndex", "StepSchedule", "Trajectory",
    "ddim_mean", "ddim_step", "draw_noise", "gaussian_log_prob", "generate", "guided_output", "make_schedule",
    "prompt_conditioning", "sample", "sample_prompts", "schedule_for", "stage_schedule", "step_log_prob", "step_mean",
    "step_prediction",
]


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 20
    eta: float = 1.0  # 1 = DDPM-equivalent, 0 = deterministic DDIM
    guidance: float = 3.0  # classifier-free guidance scale; 1 switches it off


@dataclass(frozen=True)
class StepSchedule:
    """DDIM coefficients of each step k = 1..K (entry 0 unused; all tensors have K+1 entries)."""

    timesteps: torch.Tensor  # long: the model's timestep t at step k
    alpha_prod: torch.Tensor  # alpha-bar at t
    alpha_prod_prev: torch.Tensor  # alpha-bar at the step's target timestep
    sigma: torch.Tensor  # sampler noise scale sigma_k = eta * sqrt(var_k)
    prediction_type: str
    clip_range: float | None  # clamp of the predicted x_0, None when off

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def from_output(self, model_output: torch.Tensor, sample: torch.Tensor, k: StepIndex) -> Prediction:
        """mu(x_k, k) and the predicted x_0 of step k (k an int or a CPU (B,) tensor): :func:`ddim_step`.

        The step rule is the schedule's: flow models' :class:`rlr_core.flow.FlowSchedule` has its own."""
        return ddim_step(model_output, sample, self.alpha_prod[k], self.alpha_prod_prev[k], self.sigma[k],
                         self.prediction_type, self.clip_range)


# Schedules by (scheduler config, steps, eta). Each is computed on a private copy of the
# scheduler, so a backend's scheduler is never mutated and sampling needs no lock; the entries
# are shared read-only (nobody writes into a StepSchedule's tensors).
_SCHEDULES: OrderedDict[tuple[str, int, float], StepSchedule] = OrderedDict()
_SCHEDULES_LOCK = threading.Lock()
_SCHEDULES_MAX = 64


def make_schedule(scheduler: DDIMScheduler, steps: int, eta: float) -> StepSchedule:
    """The step table of ``scheduler`` for ``steps`` steps, exactly as ``DDIMScheduler.step`` computes it.

    ``scheduler`` itself is left untouched (its ``set_timesteps`` state is shared by everyone
    who holds the backend)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if scheduler.config.thresholding:
        raise ValueError("dynamic thresholding is not supported by the sampler")
    key = (json.dumps(dict(scheduler.config), sort_keys=True, default=str), int(steps), float(eta))
    with _SCHEDULES_LOCK:
        if key in _SCHEDULES:
            _SCHEDULES.move_to_end(key)
            return _SCHEDULES[key]
    schedule = _compute_schedule(DDIMScheduler.from_config(scheduler.config), int(steps), float(eta))
    with _SCHEDULES_LOCK:
        _SCHEDULES[key] = schedule
        while len(_SCHEDULES) > _SCHEDULES_MAX:
            _SCHEDULES.popitem(last=False)
    return schedule


def schedule_for(backend: DiffusionBackend, steps: int, eta: float,
                 training: bool = False) -> StepSchedule | FlowSchedule:
    """The backend's step table (:meth:`DiffusionBackend.step_schedule`), DDIM's by default."""
    own = backend.step_schedule(steps, eta, training=training)
    return own if own is not None else make_schedule(backend.scheduler, steps, eta)


def _compute_schedule(scheduler: DDIMScheduler, steps: int, eta: float) -> StepSchedule:
    """The step table from ``scheduler``, a private copy this call may mutate."""
    config = scheduler.config
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.long().cpu()  # sampling order: ts[0] is step K
    prev = ts - config.num_train_timesteps // steps
    ac = scheduler.alphas_cumprod.float()
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    a_t = ac[ts]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * var.sqrt()

    def by_k(v: torch.Tensor) -> torch.Tensor:  # sampling order -> entry k (k = K first), entry 0 unused
        return torch.cat([torch.zeros_like(v[:1]), v.flip(0)])

    return StepSchedule(
        timesteps=by_k(ts), alpha_prod=by_k(a_t), alpha_prod_prev=by_k(a_prev), sigma=by_k(sigma),
        prediction_type=config.prediction_type,
        clip_range=float(config.clip_sample_range) if config.clip_sample else None,
    )


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) coefficient against a (B, ...) state."""
    v = v.to(like.device, like.dtype)
    return v.reshape(-1, *[1] * (like.ndim - 1)) if v.ndim == 1 else v


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
    clip_range: float | None,
) -> Prediction:
    """mu of one DDIM step (DDIM paper eq. 12), differentiable, with the predicted x_0 it is built on.

    Coefficients are scalars or per sample."""
    a_t, a_prev, s = (_per_sample(v, sample) for v in (alpha_prod, alpha_prod_prev, sigma))
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (sample - b_t.sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / b_t.sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)  # as diffusers: eps is not re-derived from the clipped x_0
    return Prediction(a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp(min=0).sqrt() * eps, x0)


def ddim_mean(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
    clip_range: float | None,
) -> torch.Tensor:
    """mu of one DDIM step (see :func:`ddim_step`)."""
    return ddim_step(model_output, sample, alpha_prod, alpha_prod_prev, sigma, prediction_type, clip_range).mean


class Conditioning:
    """Per-step, per-sample text conditioning, with the unconditional embedding for guidance.

    ``cond`` is one (B, L, D) tensor for every step, a sequence of K tensors in sampling order
    (the first is used at step K), or a function k -> (B, L, D) of the step number k. The per-step
    forms are what Diffusive Chain-of-Thought needs (method doc section 5).
    """

    def __init__(self, cond: torch.Tensor | Sequence[torch.Tensor] | Callable[[int], torch.Tensor],
                 num_steps: int, uncond: torch.Tensor | None = None):
        self.num_steps = num_steps
        if isinstance(cond, torch.Tensor):
            self._fixed: torch.Tensor | None = cond
            self._by_k: torch.Tensor | None = None
        else:
            if callable(cond):
                per_step = [cond(k) for k in range(num_steps, 0, -1)]
            else:
                per_step = list(cond)
            if len(per_step) != num_steps:
                raise ValueError(f"need one conditioning per step ({num_steps}), got {len(per_step)}")
            self._fixed = None
            self._by_k = torch.stack([torch.zeros_like(per_step[0]), *per_step[::-1]])  # entry k = step k
        self.uncond = uncond

    @property
    def batch(self) -> int:
        return len(self._fixed) if self._fixed is not None else self._by_k.shape[1]

    def at(self, k: StepIndex) -> torch.Tensor:
        if self._fixed is not None:
            return self._fixed
        if isinstance(k, torch.Tensor) and k.ndim == 1:
            return self._by_k[k.cpu(), torch.arange(len(k))]
        return self._by_k[int(k)]

    def take(self, rows: torch.Tensor) -> Conditioning:
        """The conditioning of a subset (or re-ordering) of the batch rows."""
        out = Conditioning.__new__(Conditioning)
        out.num_steps = self.num_steps
        out._fixed = self._fixed[rows] if self._fixed is not None else None
        out._by_k = self._by_k[:, rows] if self._by_k is not None else None
        out.uncond = self.uncond[rows] if self.uncond is not None else None
        return out


def stage_schedule(stage_conds: Sequence[torch.Tensor], num_steps: int,
                   stages: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per-step conditioning (sampling order) from per-stage conditionings, coarse first (DCoT).

    ``stages[i]`` is the stage of sampling step i (e.g. ``rlr_core.dcot.stage_of_steps``);
    without it the chain is split into equal stages."""
    n = len(stage_conds)
    if stages is None:
        stages = [min(i * n // num_steps, n - 1) for i in range(num_steps)]
    if len(stages) != num_steps:
        raise ValueError(f"need a stage for each of the {num_steps} steps, got {len(stages)}")
    return [stage_conds[s] for s in stages]


def _uses_cfg(backend: DiffusionBackend, guidance: float) -> bool:
    """Whether sampling at ``guidance`` needs the unconditional embedding (classifier-free guidance)."""
    return guidance != 1.0 and not backend.guidance_in_model


def guided_output(backend: DiffusionBackend, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The denoiser output with classifier-free guidance: u + g (c - u); one batched call. A model
    that takes the guidance scale as an input (FLUX.1-dev's embedded guidance) gets it instead."""
    if backend.guidance_in_model:
        return backend.model_output(x, t, cond, guidance=guidance)
    if uncond is None or guidance == 1.0:
        return backend.model_output(x, t, cond)
    out_u, out_c = backend.guided_model_outputs(x, t, uncond, cond)
    return out_u + guidance * (out_c - out_u)


def step_prediction(backend: DiffusionBackend, schedule: StepSchedule | FlowSchedule, x: torch.Tensor, k: StepIndex,
                    cond: Conditioning, guidance: float) -> Prediction:
    """mu_theta(x_k, k, c) and the predicted x_0 of step k, differentiable in the denoiser's parameters.

    ``k`` may be a (B,) tensor: each sample then takes its own step (timestep, coefficients
    and per-step conditioning)."""
    if isinstance(k, torch.Tensor) and k.ndim == 1:
        kk = k.cpu()
        t = schedule.timesteps[kk].to(x.device)
    else:
        kk = int(k)
        t = schedule.timesteps[kk].to(x.device)
    out = guided_output(backend, x, t, cond.at(k), cond.uncond, guidance)
    return schedule.from_output(out, x, kk)


def step_mean(backend: DiffusionBackend, schedule: StepSchedule, x: torch.Tensor, k: StepIndex,
              cond: Conditioning, guidance: float) -> torch.Tensor:
    """mu_theta(x_k, k, c): the mean of step k (see :func:`step_prediction`)."""
    return step_prediction(backend, schedule, x, k, cond, guidance).mean


def step_x0(backend: DiffusionBackend, schedule: StepSchedule, x: torch.Tensor, k: StepIndex,
            cond: Conditioning, guidance: float) -> torch.Tensor:
    """The model's prediction of x_0 from the state x at the input of step k (Tweedie)."""
    return step_prediction(backend, schedule, x, k, cond, guidance).x0


def step_log_prob(backend: DiffusionBackend, schedule: StepSchedule, x_k: torch.Tensor, x_prev: torch.Tensor,
                  k: StepIndex, cond: Conditioning, guidance: float) -> torch.Tensor:
    """log p_theta(x_{k-1} | x_k, c) per sample (B,), differentiable; needs sigma_k > 0."""
    kk = k.cpu() if isinstance(k, torch.Tensor) else int(k)
    sigma = schedule.sigma[kk]
    if bool((sigma <= 0).any()):
        raise ValueError("log p(x_{k-1} | x_k) is undefined at a deterministic step (sigma_k = 0)")
    return gaussian_log_prob(x_prev, step_mean(backend, schedule, x_k, k, cond, guidance), sigma)


@dataclass
class SampleResult:
    x0: torch.Tensor
    trajectory: Trajectory | None


@torch.no_grad()
def sample(backend: DiffusionBackend, cond: Conditioning, settings: SamplerSettings, generator: torch.Generator,
           record: bool = False, x_init: torch.Tensor | None = None,
           schedule: StepSchedule | None = None, on_step: Sequence[Callable[[Step], None]] = (),
           noise: torch.Tensor | None = None) -> SampleResult:
    """Run the chain from x_K (drawn from ``generator`` unless given) to x_0.

    The noise is drawn in the same order as the plain loop in :mod:`tests.oracles.diffusers_loop` (x_K,
    then one draw per step, also at sigma = 0), so the same seed gives the same images. ``on_step``
    hooks see each step (see :mod:`rlr_core.rollout`). ``noise``: a (K+1, B, *state) table of the
    steps' draws instead of the generator's."""
    schedule = schedule or schedule_for(backend, settings.steps, settings.eta)
    x = x_init if x_init is not None else backend.initial_noise(cond.batch, generator)

    def predict(x: torch.Tensor, k: StepIndex) -> Prediction:
        return step_prediction(backend, schedule, x, k, cond, settings.guidance)

    run = rollout(predict, x, schedule.sigma, generator if noise is None else noise, start=schedule.num_steps,
                  record=record, on_step=on_step)
    return SampleResult(run.x, run.trajectory)


def prompt_conditioning(backend: DiffusionBackend, prompts: list[str], num_steps: int,
                        stage_prompts: Sequence[list[str]] | None = None, guidance: float = 1.0,
                        stages: Sequence[int] | None = None) -> Conditioning:
    """Encode prompts into a Conditioning; for DCoT, per-stage prompt lists (coarse first) and
    optionally the stage of each sampling step (see :func:`stage_schedule`)."""
    uncond = backend.unconditional(len(prompts)) if _uses_cfg(backend, guidance) else None
    if stage_prompts:
        encoded = [backend.encode_prompts(list(p)) for p in stage_prompts]
        return Conditioning(stage_schedule(encoded, num_steps, stages), num_steps, uncond)
    return Conditioning(backend.encode_prompts(prompts), num_steps, uncond)


def generate(backend: DiffusionBackend, prompts: list[str], settings: SamplerSettings = SamplerSettings(),
             seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] for ``prompts`` (no record): the app's plain entry point."""
    cond = prompt_conditioning(backend, prompts, settings.steps, guidance=settings.guidance)
    result = sample(backend, cond, settings, torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        return backend.decode(result.x0).cpu()


@torch.no_grad()
def generate_per_row_seeds(backend: DiffusionBackend, prompts: list[str], settings: SamplerSettings,
                           seeds: Sequence[int]) -> torch.Tensor:
    """:func:`generate` in one batch, each run of equal ``seeds`` drawn as :func:`generate` draws it
    alone (x_K, then one draw per step, from its own generator): a row's noise does not depend on
    which rows share the batch."""
    schedule = schedule_for(backend, settings.steps, settings.eta)
    inits, tables = [], []
    for seed, run in itertools.groupby(seeds):
        n = len(list(run))
        generator = torch.Generator("cpu").manual_seed(int(seed))
        x = backend.initial_noise(n, generator)
        draws = [draw_noise(x, generator) for _ in range(schedule.num_steps)]  # k = K, ..., 1
        inits.append(x)
        tables.append(torch.stack([torch.zeros_like(x), *reversed(draws)]))  # entry k = eps_k
    cond = prompt_conditioning(backend, prompts, settings.steps, guidance=settings.guidance)
    result = sample(backend, cond, settings, torch.Generator("cpu"), x_init=torch.cat(inits), schedule=schedule,
                    noise=torch.cat(tables, dim=1))
    return backend.decode(result.x0).cpu()


@torch.no_grad()
def sample_prompts(backend: DiffusionBackend, prompts_per_step: Sequence[Sequence[str]], settings: SamplerSettings,
                   seed: int, capture_steps: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Images in [0, 1] where ``prompts_per_step[i][b]`` conditions image b at sampling step i
    (i = 0 .. K-1, noise first; the DCoT schedules), and, for each i in ``capture_steps``, the
    decoded prediction of the final image made at step i: what the chain has decided so far.

    With one prompt at every step this is :func:`generate` (same seed, same images)."""
    K = len(prompts_per_step)
    if K != settings.steps:
        raise ValueError(f"need one prompt list per step ({settings.steps}), got {K}")
    encoded: dict[tuple[str, ...], torch.Tensor] = {}
    for step_prompts in prompts_per_step:  # each distinct prompt list encoded once
        key = tuple(step_prompts)
        if key not in encoded:
            encoded[key] = backend.encode_prompts(list(key))
    per_step = [encoded[tuple(p)] for p in prompts_per_step]
    batch = len(prompts_per_step[0])
    uncond = backend.unconditional(batch) if _uses_cfg(backend, settings.guidance) else None
    cond = Conditioning(per_step[0] if len(encoded) == 1 else per_step, K, uncond)
    captured: dict[int, torch.Tensor] = {}
    wanted = set(capture_steps)

    def capture(step: Step) -> None:
        i = K - int(step.k)
        if i in wanted:
            captured[i] = backend.decode(step.prediction.x0).cpu()

    result = sample(backend, cond, settings, torch.Generator("cpu").manual_seed(int(seed)), on_step=[capture])
    return backend.decode(result.x0).cpu(), captured
