"""The stochastic DDIM sampler over the backend interface, with an optional trajectory record.

Numbering follows docs/rlr-method.md section 1: the chain runs steps k = K .. 1, step k maps
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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from rlr_core.backends.base import DiffusionBackend

StepIndex = int | torch.Tensor  # one step k for the whole batch, or a (B,) tensor of per-sample k


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


def make_schedule(scheduler: DDIMScheduler, steps: int, eta: float) -> StepSchedule:
    """The step table of ``scheduler`` for ``steps`` steps, exactly as ``DDIMScheduler.step`` computes it."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    config = scheduler.config
    if config.thresholding:
        raise ValueError("dynamic thresholding is not supported by the sampler")
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


def predicted_x0_and_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor,
                         prediction_type: str, clip_range: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's x_0 (Tweedie) and noise predictions from its output at a state; differentiable."""
    a_t = _per_sample(alpha_prod, sample)
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
    return x0, eps


def ddim_mean(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod: torch.Tensor,
    alpha_prod_prev: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
    clip_range: float | None,
) -> torch.Tensor:
    """mu of one DDIM step (DDIM paper eq. 12), differentiable; coefficients scalar or per sample."""
    x0, eps = predicted_x0_and_eps(model_output, sample, alpha_prod, prediction_type, clip_range)
    a_prev, s = (_per_sample(v, sample) for v in (alpha_prod_prev, sigma))
    return a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp(min=0).sqrt() * eps


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """log N(x_prev; mean, sigma^2 I) per sample (B,), constants included (method doc section 1).

    ``sigma`` is a scalar or a (B,) tensor of per-sample noise scales."""
    sigma = torch.as_tensor(sigma, dtype=mean.dtype, device=mean.device)
    sigma = sigma.expand(len(mean)) if sigma.ndim == 0 else sigma
    sq = ((x_prev - mean) ** 2).flatten(1).sum(1)
    return -sq / (2 * sigma**2) - mean[0].numel() * (sigma.log() + 0.5 * math.log(2 * math.pi))


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


def guided_output(backend: DiffusionBackend, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """The denoiser output with classifier-free guidance: u + g (c - u); one batched call."""
    if uncond is None or guidance == 1.0:
        return backend.model_output(x, t, cond)
    tt = t.repeat(2) if t.ndim == 1 else t
    both = backend.model_output(torch.cat([x, x]), tt, torch.cat([uncond, cond]))
    out_u, out_c = both.chunk(2)
    return out_u + guidance * (out_c - out_u)


def _guided_at(backend: DiffusionBackend, schedule: StepSchedule, x: torch.Tensor, k: StepIndex,
               cond: Conditioning, guidance: float) -> tuple[torch.Tensor, int | torch.Tensor]:
    """The guided denoiser output at step k's timestep, and k as an index into the schedule."""
    kk = k.cpu() if isinstance(k, torch.Tensor) and k.ndim == 1 else int(k)
    t = schedule.timesteps[kk].to(x.device)
    return guided_output(backend, x, t, cond.at(k), cond.uncond, guidance), kk


def step_mean(backend: DiffusionBackend, schedule: StepSchedule, x: torch.Tensor, k: StepIndex,
              cond: Conditioning, guidance: float) -> torch.Tensor:
    """mu_theta(x_k, k, c): the mean of step k, differentiable in the denoiser's parameters.

    ``k`` may be a (B,) tensor: each sample then takes its own step (timestep, coefficients
    and per-step conditioning)."""
    out, kk = _guided_at(backend, schedule, x, k, cond, guidance)
    return ddim_mean(out, x, schedule.alpha_prod[kk], schedule.alpha_prod_prev[kk], schedule.sigma[kk],
                     schedule.prediction_type, schedule.clip_range)


def step_x0(backend: DiffusionBackend, schedule: StepSchedule, x: torch.Tensor, k: StepIndex,
            cond: Conditioning, guidance: float) -> torch.Tensor:
    """The model's prediction of x_0 from the state x at the input of step k (Tweedie)."""
    out, kk = _guided_at(backend, schedule, x, k, cond, guidance)
    return predicted_x0_and_eps(out, x, schedule.alpha_prod[kk], schedule.prediction_type, schedule.clip_range)[0]


def step_log_prob(backend: DiffusionBackend, schedule: StepSchedule, x_k: torch.Tensor, x_prev: torch.Tensor,
                  k: StepIndex, cond: Conditioning, guidance: float) -> torch.Tensor:
    """log p_theta(x_{k-1} | x_k, c) per sample (B,), differentiable; needs sigma_k > 0."""
    kk = k.cpu() if isinstance(k, torch.Tensor) else int(k)
    sigma = schedule.sigma[kk]
    if bool((sigma <= 0).any()):
        raise ValueError("log p(x_{k-1} | x_k) is undefined at a deterministic step (sigma_k = 0)")
    return gaussian_log_prob(x_prev, step_mean(backend, schedule, x_k, k, cond, guidance), sigma)


@dataclass
class Trajectory:
    """A recorded chain, indexed by step number k (entry 0 unused where it has no meaning).

    x[k] = x_k for k = 0..K; noise[k] = eps_k, mean[k] = mu_theta(x_k, k, c), log_prob[k] =
    log p(x_{k-1} | x_k) for k = 1..K (0 at deterministic steps, where sigma_k = 0); sigma[k]."""

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
class SampleResult:
    x0: torch.Tensor
    trajectory: Trajectory | None


def draw_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Drawn on the generator's device (CPU) and moved, like the plain diffusers loop: same seeds,
    # same images on every device.
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


@torch.no_grad()
def sample(backend: DiffusionBackend, cond: Conditioning, settings: SamplerSettings, generator: torch.Generator,
           record: bool = False, x_init: torch.Tensor | None = None,
           schedule: StepSchedule | None = None) -> SampleResult:
    """Run the chain from x_K (drawn from ``generator`` unless given) to x_0.

    The noise is drawn in the same order as the plain loop in :mod:`tests.oracles.diffusers_loop` (x_K,
    then one draw per step, also at sigma = 0), so the same seed gives the same images."""
    schedule = schedule or make_schedule(backend.scheduler, settings.steps, settings.eta)
    K = schedule.num_steps
    x = x_init if x_init is not None else backend.initial_noise(cond.batch, generator)
    xs, noises, means, logps = [x], [], [], []
    for k in range(K, 0, -1):
        mu = step_mean(backend, schedule, x, k, cond, settings.guidance)
        eps = draw_noise(x, generator)
        sigma = schedule.sigma[k]
        x = mu + sigma.to(x.device) * eps if sigma > 0 else mu
        if record:
            xs.append(x)
            noises.append(eps)
            means.append(mu)
            logps.append(gaussian_log_prob(x, mu, sigma) if sigma > 0 else torch.zeros(len(x), device=x.device))
    if not record:
        return SampleResult(x, None)

    def by_k(seq: list[torch.Tensor]) -> torch.Tensor:  # sampling order -> entry k, entry 0 a zero pad
        return torch.stack([torch.zeros_like(seq[0]), *seq[::-1]])

    traj = Trajectory(x=torch.stack(xs[::-1]), noise=by_k(noises), mean=by_k(means), log_prob=by_k(logps),
                      sigma=schedule.sigma.clone())
    return SampleResult(x, traj)


def prompt_conditioning(backend: DiffusionBackend, prompts: list[str], num_steps: int,
                        stage_prompts: Sequence[list[str]] | None = None, guidance: float = 1.0,
                        stages: Sequence[int] | None = None) -> Conditioning:
    """Encode prompts into a Conditioning; for DCoT, per-stage prompt lists (coarse first) and
    optionally the stage of each sampling step (see :func:`stage_schedule`)."""
    uncond = backend.unconditional(len(prompts)) if guidance != 1.0 else None
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
