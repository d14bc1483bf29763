"""Training rounds: fine-tune a backend's denoiser on a differentiable reward with one estimator.

    result = run_round(backend, reward_fn, TrainConfig(...), "versions/v3",
                       progress=callback, stop=threading.Event())

A round builds the LoRA adapter (or unfreezes the denoiser for full fine-tuning), runs
``config.steps`` AdamW steps with gradient clipping, and writes one version folder (weights,
config.json, metrics.json; see :mod:`rlr_core.training.lora`). It can be stopped cleanly between steps
(``stop`` event set, or the progress callback returning True): the version then holds what was
trained so far. A non-finite reward, loss or gradient, or a gradient norm far above the round's
running median, raises :class:`TrainingDiverged`: the trainable weights are restored to their
state at the start of the round and no version is written.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlr_core import dcot
from rlr_core.backends.base import DiffusionBackend
from rlr_core.estimators import Estimate, Estimator, make_estimator
from rlr_core.estimators.backend_chain import BackendChain, RewardFn
from rlr_core.estimators.kl import ANCHOR_BATCH, anchor_kl_backward
from rlr_core.sampler import SamplerSettings
from rlr_core.training import lora
from rlr_core.training.resume import RoundState

KL_REFERENCES = ("parent", "base")  # what the KL terms measure against (TrainConfig.kl_reference)
DEFAULT_PROMPTS = [
    "a red circle", "a blue square", "a yellow triangle", "a large green circle",
    "a small purple square", "an orange triangle on the left",
]


@dataclass
class EstimatorConfig:
    """The gradient estimator a round uses: its name and its own keyword settings."""

    name: str = "rlr"
    options: dict = field(default_factory=dict)  # e.g. RLR: block, rest, window; truncated-bp: steps


@dataclass
class TrainConfig:
    # A bare name is accepted as shorthand for that estimator with its default settings.
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    steps: int = 20  # optimiser steps (DDPO: sample batches; it takes inner_epochs steps each)
    batch: int = 4  # trajectories per step (>= 2: the leave-one-out baseline needs others)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    stage_prompts: dict[str, list[str]] | None = None  # DCoT: prompt -> [coarse, mid, fine]
    stage_boundaries: tuple[float, float] = dcot.DEFAULT_BOUNDARIES  # where mid and fine start
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    finetune: Literal["lora", "full"] = "lora"
    lora_rank: int = 4
    lora_alpha: float | None = None  # default: the rank (scale 1)
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clipping threshold (the unclipped norm is reported)
    # Optional: abort when the grad norm exceeds factor x the round's running median. Off by default:
    # likelihood-ratio terms (LR, DDPO, RLR's rest of chain) are heavy-tailed, and bench.alignment
    # measured single batches 1e4x (RLR) and 2.5e6x (DDPO, whose clipped epochs have ~0 gradient)
    # the median in healthy runs. Clipping bounds every step; non-finite values always stop a round.
    explode_factor: float | None = None
    seed: int = 0
    # Prior preservation: beta_a of the exact per-step KL to the round's parent on the backend's
    # anchor prompts (rlr_core/estimators/kl.py, anchor_kl_backward); 0 or no anchors: off.
    anchor_kl: float = 0.0
    # What the KL terms measure against (LoRA rounds): "parent", the adapter as the round found it;
    # "base", the base model (the adapter switched off), so the change of every earlier round counts too.
    kl_reference: Literal["parent", "base"] = "parent"
    # Prior preservation by reward: this many extra rows per batch drawn from the backend's anchor
    # prompts (none of the round's own). The reward function sees them among the batch's prompts and
    # rewards them as it sees fit: the app's (app/training_job.py, ProxyReward) by fidelity alone.
    anchor_rows: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.estimator, str):
            self.estimator = EstimatorConfig(self.estimator)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The inverse of :meth:`to_dict`; also reads the flat form of older version folders
        (``"estimator": name`` with a separate ``"estimator_options"``)."""
        d = dict(d)
        if isinstance(d.get("sampler"), dict):
            d["sampler"] = SamplerSettings(**d["sampler"])
        est = d.get("estimator")
        if isinstance(est, dict):
            d["estimator"] = EstimatorConfig(**est)
        elif isinstance(est, str):
            d["estimator"] = EstimatorConfig(est, dict(d.get("estimator_options") or {}))
        if d.get("stage_boundaries") is not None:
            d["stage_boundaries"] = tuple(d["stage_boundaries"])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


@dataclass
class Progress:
    step: int  # steps done
    total: int
    reward_mean: float
    reward_std: float
    loss: float
    grad_norm: float
    elapsed: float  # seconds since the round started
    samples: int  # trajectories drawn so far


@dataclass
class RoundResult:
    version: Path | None  # the version folder written (None when nothing was written)
    metrics: dict
    stopped: bool
    state: RoundState | None = None  # set when a time budget paused the round: resume from it


class TrainingDiverged(RuntimeError):
    """The round hit a NaN/inf or an exploding gradient; the last good version is untouched."""


ProgressFn = Callable[[Progress], bool | None]


def trainable_parameters(backend: DiffusionBackend, config: TrainConfig) -> list[torch.nn.Parameter]:
    """LoRA: continue the backend's adapter if it has one (a loaded version), else add a fresh one.
    Full: every denoiser weight."""
    if config.finetune == "lora":
        if lora.has_lora(backend):
            backend.denoiser.requires_grad_(False)
            params = lora.lora_parameters(backend)
            for p in params:
                p.requires_grad_(True)
            return params
        return lora.add_lora(backend, config.lora_rank, config.lora_alpha, seed=config.seed)
    if config.finetune == "full":
        lora.remove_lora(backend)
        backend.denoiser.requires_grad_(True)
        return list(backend.denoiser.parameters())
    raise ValueError(f"finetune must be 'lora' or 'full', not {config.finetune!r}")


class _Guard:
    """Checks each step's numbers; keeps a copy of the weights to restore on divergence."""

    def __init__(self, params: list[torch.nn.Parameter], explode_factor: float | None):
        self.params = params
        self.explode_factor = explode_factor
        self.norms: list[float] = []
        self.snapshot = [p.detach().clone() for p in params]

    def check(self, what: str, value: float) -> None:
        if not math.isfinite(value):
            raise TrainingDiverged(f"{what} is {value}: stopping the round; the last good version is kept")

    def check_grad_norm(self, norm: float) -> None:
        self.check("the gradient norm", norm)
        if self.explode_factor is not None and len(self.norms) >= 5:
            median = statistics.median(self.norms)
            if median > 0 and norm > self.explode_factor * median:
                raise TrainingDiverged(
                    f"the gradient norm exploded ({norm:.3g}, {norm / median:.0f}x the round's median "
                    f"{median:.3g}): stopping the round; the last good version is kept")
        self.norms.append(norm)

    @torch.no_grad()
    def restore(self) -> None:
        for p, s in zip(self.params, self.snapshot):
            p.copy_(s)


def _batch_prompts(rng: random.Random, prompts: list[str], batch: int, anchors: list[str],
                   anchor_rows: int) -> list[str]:
    """The step's prompts: ``batch`` drawn from the round's, then ``anchor_rows`` from ``anchors``."""
    extra = [rng.choice(anchors) for _ in range(anchor_rows)] if anchors else []
    return [rng.choice(prompts) for _ in range(batch)] + extra


def anchor_pool(backend: DiffusionBackend, config: TrainConfig) -> list[str]:
    """The anchor prompts a round's extra rows come from: the backend's, less the round's own."""
    return [a for a in backend.anchor_prompts if a not in config.prompts] if config.anchor_rows else []


def run_round(backend: DiffusionBackend, reward_fn: RewardFn, config: TrainConfig, out: str | Path,
              progress: ProgressFn | None = None, stop: threading.Event | None = None,
              accelerator=None, estimator: Estimator | None = None, resume: RoundState | None = None,
              budget_s: float | None = None, pause_at: int | None = None, hold: bool = False) -> RoundResult:
    """Run one training round and write its version folder ``out`` (see the module docstring).

    ``accelerator``: an ``accelerate.Accelerator`` (the CLI passes one); gradients are averaged
    over its processes and only the main process writes the version.
    ``budget_s``: pause (at least one step in) before a step that would end past this many
    seconds; the result then has no version and a ``state`` that ``resume`` continues from
    (:mod:`rlr_core.training.resume`, :mod:`rlr_core.training.chunked`). ``pause_at``: pause the
    same way once this many steps are done; ``hold``: pause after the last step too, instead of
    writing the version (the caller checks the weights first, then resumes to write it)."""
    if config.batch < 2:
        raise ValueError("batch must be at least 2 (the leave-one-out baseline needs other samples)")
    if not config.prompts:
        raise ValueError("no prompts to train on")
    for p in config.prompts:
        backend.check_prompt(p)
    if accelerator is not None and (resume is not None or budget_s is not None or pause_at is not None or hold):
        raise ValueError("pausing and resuming a round is not supported with an accelerator")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1  # each process draws its own batch
    torch.manual_seed(config.seed)
    generator = torch.Generator("cpu").manual_seed(config.seed * 1000 + rank)
    rng = random.Random(config.seed * 1000 + rank)

    params = trainable_parameters(backend, config)
    backend.prepare_for_training()  # e.g. gradient checkpointing inside a large UNet on CUDA
    backend.denoiser.eval()  # no dropout in the denoiser; eval keeps sampling deterministic per seed
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if accelerator is not None:
        optimizer = accelerator.prepare(optimizer)
    if resume is not None:
        estimator = resume.estimator
        resume.restore(params, optimizer, generator, rng)
    estimator = estimator or make_estimator(config.estimator.name, **config.estimator.options)
    chain = BackendChain(backend, reward_fn, config.sampler)
    anchors = list(backend.anchor_prompts) if config.anchor_kl and config.finetune == "lora" else []
    anchored = anchor_pool(backend, config)
    if (config.estimator.options.get("kl_coef") or anchors) and config.finetune == "lora":
        # KL to the round's parent (the adapter as the round found it), kept across pauses; with
        # kl_reference "base" no reference is kept: the chain's reference is then the base model.
        if resume is not None and resume.reference is not None:
            chain.reference = [r.to(p.device, p.dtype) for r, p in zip(resume.reference, params)]
        elif config.kl_reference == "parent":
            chain.set_reference()
    guard = _Guard(params, config.explode_factor)
    first = resume.step if resume is not None else 0
    if resume is not None:
        guard.norms = list(resume.grad_norms)

    def zero_grad() -> None:
        optimizer.zero_grad(set_to_none=True)

    anchor_kl: list[float] = []  # this step's prior-preservation KL, one per optimiser step

    def optimizer_step() -> float:
        if anchors:  # its gradient joins the estimator's before clipping
            ctx = chain.context([rng.choice(anchors) for _ in range(ANCHOR_BATCH)])
            anchor_kl.append(anchor_kl_backward(chain, ctx, config.anchor_kl, generator))
        if accelerator is not None and accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        guard.check_grad_norm(norm)
        optimizer.step()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingDiverged("the weights became non-finite: stopping the round; the last good version is kept")
        return norm

    history: list[dict] = list(resume.history) if resume is not None else []
    start = time.perf_counter() - (resume.elapsed if resume is not None else 0.0)
    stopped = paused = False
    chunk_start, longest_step = time.perf_counter(), 0.0
    try:
        for step in range(first, config.steps):
            if stop is not None and stop.is_set():
                stopped = True
                break
            now = time.perf_counter()
            if step > first and ((budget_s is not None and now - chunk_start + longest_step > budget_s)
                                 or (pause_at is not None and step >= pause_at)):
                paused = True  # the next step would not fit in the budget, or the caller checks here
                break
            anchor_kl.clear()
            prompts = _batch_prompts(rng, config.prompts, config.batch, anchored, config.anchor_rows)
            ctx = chain.context(prompts, *_stage_plan(config, prompts))
            est = estimator.step(chain, ctx, generator, optimizer_step, zero_grad,
                                 check=lambda e: _check_estimate(guard, e))
            norm = est.stats["grad_norm"]
            row = {"step": step + 1, "reward_mean": est.reward_mean, "reward_std": est.reward_std,
                   "loss": est.loss, "grad_norm": norm, "elapsed": time.perf_counter() - start,
                   "samples": (step + 1) * config.batch * world,
                   **{k: v for k, v in est.stats.items() if k != "grad_norm"}}
            if anchor_kl:
                row["anchor_kl"] = sum(anchor_kl) / len(anchor_kl)
            history.append(row)
            longest_step = max(longest_step, time.perf_counter() - now)
            if progress is not None:
                keys = ("reward_mean", "reward_std", "loss", "grad_norm", "elapsed", "samples")
                if progress(Progress(step + 1, config.steps, **{k: row[k] for k in keys})):
                    stopped = True
                    break
    except TrainingDiverged:
        guard.restore()
        zero_grad()
        raise
    finally:
        for p in params:
            p.grad = None

    if hold and not stopped and history and len(history) == config.steps:
        paused, step = True, config.steps  # done: the caller writes the version once it has checked it
    if paused:
        return RoundResult(None, {}, False, RoundState.capture(
            step, params, optimizer, generator, rng, history, time.perf_counter() - start, guard.norms, estimator,
            chain.reference))
    metrics = _summarise(history, stopped, time.perf_counter() - start, estimator)
    version = None
    if history and (accelerator is None or accelerator.is_main_process):
        version = lora.write_version(backend, out, config.finetune,
                                     {"training": config.to_dict(), "estimator": estimator.name,
                                      "estimator_settings": estimator.settings()}, metrics)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return RoundResult(version, metrics, stopped)


def _stage_plan(config: TrainConfig, prompts: list[str]) -> tuple[list[list[str]] | None, list[int] | None]:
    """DCoT: per-stage prompt lists for this batch (prompts without stages keep their own prompt
    at every stage) and the stage of each sampling step, as the app samples them."""
    if not config.stage_prompts:
        return None, None
    per_stage = [[config.stage_prompts.get(p, [p] * 3)[s] for p in prompts] for s in range(3)]
    return per_stage, dcot.stage_of_steps(config.sampler.steps, config.stage_boundaries)


def _check_estimate(guard: _Guard, est: Estimate) -> None:
    guard.check("the reward", float(est.rewards.float().mean()))
    guard.check("the loss", est.loss)


def _summarise(history: list[dict], stopped: bool, elapsed: float, estimator: Estimator) -> dict:
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "steps_done": len(history), "stopped_early": stopped, "elapsed_s": elapsed,
        "samples": last.get("samples", 0), "estimator": estimator.name,
        "reward_mean_first": first.get("reward_mean"), "reward_mean_last": last.get("reward_mean"),
        "history": history,
    }
