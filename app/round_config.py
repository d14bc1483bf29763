"""One training round's configuration, from the Train tab or the API down to ``rlr_core.training``.

The Train tab and the ``/train_start`` endpoint send a flat dict of settings (the public form:
``estimator``, ``steps``, ``batch_size``, ... ``seed``; anything left out takes its default).
:meth:`RoundConfig.parse` checks every value and builds the one configuration a round carries:

- ``training``: the :class:`rlr_core.training.TrainConfig` the round runs, with the estimator and
  its own options nested (``EstimatorConfig``); the round runner fills in what only it knows
  (the prompts, their stage prompts, the stage boundaries, the seed, the DCoT block window);
- the app's part of a round: how many prompts it trains on and how the new version's samples are
  drawn afterwards (like the Generate tab draws them).

:meth:`RoundConfig.public` gives the flat form back (the API answer, the round's row in the store,
and the settings auto-train repeats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app import validate as check
from app.errors import AppError
from rlr_core.backends.base import DiffusionBackend
from rlr_core.sampler import SamplerSettings
from rlr_core.training import EstimatorConfig, TrainConfig

ESTIMATOR_CHOICES = [("RLR", "rlr"), ("DDPO", "ddpo"), ("Truncated backprop", "truncated-bp"),
                     ("Full backprop", "full-bp")]
REST_CHOICES = [("lr", "lr"), ("zo", "zo"), ("none (biased)", "none")]

# The public form's defaults, in the order the API has always answered with.
DEFAULTS: dict[str, Any] = {
    "estimator": "rlr",
    "steps": 20,
    # 8, not 4: at batch 4 the built-in model's rounds lowered the reward as often as they raised
    # it (observed while developing, when RLR's likelihood-ratio terms still used the leave-one-out
    # mean, not recorded in bench/results; RLR's default baseline is now "state"). The loop and
    # safeguards benchmarks (bench/results/loop.json, safeguards.json) ran at batch 8 only.
    "batch_size": 8,
    "sampling_steps": 10,
    "learning_rate": 3e-3,
    "lora_rank": 4,
    "block": 2,  # RLR: HO block length h
    "rest": "lr",  # RLR: the rest-of-chain term
    "truncation": 3,  # truncated backprop: the last K' steps
    "max_prompts": 8,
    # 1 = no classifier-free guidance while training: half the cost, and the adapter carries
    # over to guided sampling (it shifts the guided and the unguided prediction alike).
    "guidance": 1.0,
    "samples_per_prompt": 2,  # after the round: new-version samples per prompt (and as many pairs)
    "sample_steps": 20,  # ... drawn like the Generate tab draws (20 steps, guidance 3)
    "sample_guidance": 3.0,
    "seed": None,  # None: a new random seed each round
    # Against over-optimising the proxy: maximise r - lambda * (ensemble spread), one spread
    # below the mean (a lower confidence bound); 0 switches it off.
    "uncertainty_penalty": 1.0,
    # End the round after this many steps without a new best (smoothed) penalised reward; 0: never.
    "patience": 8,
    # Against losing what the rater cannot see (app/fidelity_guard.py, rlr_core/estimators/kl.py):
    "kl_coef": 0.0,  # beta of the exact per-step KL to the round's parent, any estimator; 0: off
    "fidelity_weight": 0.0,  # w in reward + w * fidelity, where the backend's judge is differentiable
    "fidelity_threshold": 0.05,  # a version this far below its parent or the base is flagged; 0: off
    "fidelity_check_every": 10,  # probe fidelity inside the round every N steps (early stop); 0: off
}


# The built-in image model's pick, from the loop the person lives with (bench/loop.py,
# docs/benchmarks.md "The loop"; bench/results/loop.json, loop_screen.json): a proxy learnt from
# 32 ratings and 24 comparisons per round, four rounds in a row, judged from the pixels.
# Truncated backprop (the race's pick on a fixed reward) raised the bold rater's score most in a
# round (0.41 -> 0.60) but lost pixel-judged prompt fidelity (0.91 -> 0.74) and image quality
# (0.86 -> 0.68): the guard flagged every version it made, so the person kept the base model.
# RLR's rounds kept fidelity within 0.05 of the base. patience 0: RLR's noisier per-step reward
# made the plateau stop end its rounds at step 9 of 20. The fidelity term and the KL to the
# round's parent keep each round's step on the prompt and small.
BUILTIN_IMAGE_PICK: dict[str, Any] = {"estimator": "rlr", "patience": 0, "fidelity_weight": 1.0, "kl_coef": 0.3}
BUILTIN_IMAGE_DEFAULTS: dict[str, Any] = {**DEFAULTS, **BUILTIN_IMAGE_PICK}
# Stable Diffusion and AnimateDiff (docs/own-model.md, "Round defaults"): learning rate 3e-4, the
# top of the range docs/own-model.md recommends for a LoRA on Stable Diffusion (and DDPO's
# published SD 1.5 LoRA configuration); batch 2, the batch measured on a GPU
# (bench/results/gpu_sd15.json). No loop benchmark has been run on these models.
LATENT_PICK: dict[str, Any] = {"learning_rate": 3e-4, "batch_size": 2}
# Stable Diffusion XL (docs/own-model.md, "Stable Diffusion XL"); nothing here was measured on SDXL.
# learning rate 1e-4: the default of diffusers' SDXL LoRA training script
# (train_text_to_image_lora_sdxl.py in diffusers' examples), a peer's published configuration;
# batch 2 and block 2: the SD 1.5 choice (bench/results/gpu_sd15.json), kept for SDXL's ~3x larger
# UNet at 4x the pixels; sample_guidance 5.0: StableDiffusionXLPipeline's default guidance_scale.
# Training guidance stays 1 (DEFAULTS: half the cost, the adapter carries over to guided sampling).
SDXL_PICK: dict[str, Any] = {"learning_rate": 1e-4, "batch_size": 2, "block": 2, "sample_guidance": 5.0}
# Stable Diffusion 3 / 3.5 (docs/own-model.md, "Stable Diffusion 3"); nothing here was measured on it.
# From Flow-GRPO's SD3.5-Medium configuration (github.com/yifan123/flow_grpo, config/base.py and
# general_ocr_sd3 in config/grpo.py): learning rate 3e-4 (train.learning_rate), 10 sampling steps
# while training (sample.num_steps) and 40 to draw (sample.eval_num_steps), guidance 4.5 while
# sampling and training (sample.guidance_scale, train.cfg = True); LoRA rank 32 (their
# train_sd3.py script, r=32, lora_alpha=64: here alpha = rank; not re-checked). Their noise level 0.7 is the
# backend's (rlr_core/backends/flow_models.py, NOISE_LEVEL). Batch 2: the SD 1.5 choice, unmeasured.
SD3_PICK: dict[str, Any] = {"learning_rate": 3e-4, "lora_rank": 32, "sampling_steps": 10, "guidance": 4.5,
                            "sample_steps": 40, "sample_guidance": 4.5, "batch_size": 2}

# One table: a backend's ``family`` -> the settings that differ from DEFAULTS on it.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "builtin-image": BUILTIN_IMAGE_PICK,
    "builtin-clips": {},
    "stable-diffusion": LATENT_PICK,
    "animatediff": LATENT_PICK,
    "stable-diffusion-xl": SDXL_PICK,
    "stable-diffusion-3": SD3_PICK,
}
DEFAULT_NOTES: dict[str, str] = {
    "builtin-image": ("The default here is RLR with a fidelity term: in the app's own loop (a reward proxy learnt from "
                      "ratings, several rounds, judged from the pixels) truncated backprop raised the rater's score "
                      "faster but lost prompt fidelity and image quality, so the guard rejected its versions; RLR kept "
                      "the prompt (docs/benchmarks.md, the loop)."),
}
OTHER_NOTE = ("The default here is RLR, the method this app is built around; the loop benchmark has not been run on "
              "this model.")


def defaults_for(backend: DiffusionBackend) -> dict[str, Any]:
    """The public form's defaults on this model (its family's row of :data:`FAMILY_DEFAULTS`)."""
    return {**DEFAULTS, **FAMILY_DEFAULTS.get(backend.family, {})}


def defaults_note(backend: DiffusionBackend) -> str:
    """One sentence for the Train tab: why its default estimator is the default on this model."""
    return DEFAULT_NOTES.get(backend.family, OTHER_NOTE)


def _check_values(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every public setting checked (missing or empty ones take their defaults)."""
    get = lambda k: raw[k] if raw.get(k) not in (None, "") else defaults[k]
    return {
        "estimator": check.choice(get("estimator"), "estimator", [v for _, v in ESTIMATOR_CHOICES]),
        "steps": check.whole(get("steps"), "optimiser steps", 1, 2000),
        "batch_size": check.whole(get("batch_size"), "batch size", 2, 256),
        "sampling_steps": check.whole(get("sampling_steps"), "sampling steps", 3, 200),
        "learning_rate": check.real(get("learning_rate"), "learning rate", 1e-7, 1.0),
        "lora_rank": check.whole(get("lora_rank"), "LoRA rank", 1, 256),
        "block": parse_block(get("block")),
        "rest": check.choice(get("rest"), "rest of the chain", [v for _, v in REST_CHOICES]),
        "truncation": check.whole(get("truncation"), "truncation length", 1, 200),
        "max_prompts": check.whole(get("max_prompts"), "prompts per round", 1, 64),
        "guidance": check.real(get("guidance"), "guidance", 1.0, 20.0),
        "samples_per_prompt": check.whole(get("samples_per_prompt"), "samples per prompt", 1, 16),
        "sample_steps": check.whole(get("sample_steps"), "sample steps", 2, 200),
        "sample_guidance": check.real(get("sample_guidance"), "sample guidance", 1.0, 20.0),
        "seed": None if raw.get("seed") in (None, "") else check.whole(raw["seed"], "seed", 0, 2**31 - 1),
        "uncertainty_penalty": check.real(get("uncertainty_penalty"), "uncertainty penalty", 0.0, 100.0),
        "patience": check.whole(get("patience"), "patience", 0, 2000),
        "kl_coef": check.real(get("kl_coef"), "KL coefficient", 0.0, 1000.0),
        "fidelity_weight": check.real(get("fidelity_weight"), "fidelity weight", 0.0, 1000.0),
        "fidelity_threshold": check.real(get("fidelity_threshold"), "fidelity threshold", 0.0, 1.0),
        "fidelity_check_every": check.whole(get("fidelity_check_every"), "fidelity check interval", 0, 2000),
    }


def parse_block(value: Any) -> int | str:
    """RLR's block length: a whole number, or "auto" (the paper's closed form from measured memory)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return check.whole(value, "HO block length (or auto)", 1, 200)


def _estimator(v: dict[str, Any]) -> EstimatorConfig:
    """The chosen estimator with the options it takes (and only those); every estimator takes the KL."""
    kl = {"kl_coef": v["kl_coef"]} if v["kl_coef"] else {}
    if v["estimator"] == "rlr":
        return EstimatorConfig("rlr", {"block": v["block"], "rest": v["rest"], **kl})
    if v["estimator"] == "truncated-bp":  # it cannot back-propagate through more steps than the chain has
        return EstimatorConfig("truncated-bp", {"steps": min(v["truncation"], v["sampling_steps"]), **kl})
    return EstimatorConfig(v["estimator"], kl)


@dataclass(frozen=True)
class RoundConfig:
    training: TrainConfig = field(default_factory=lambda: RoundConfig.parse({}).training)
    max_prompts: int = DEFAULTS["max_prompts"]
    samples_per_prompt: int = DEFAULTS["samples_per_prompt"]
    samples: SamplerSettings = field(default_factory=lambda: SamplerSettings(
        steps=DEFAULTS["sample_steps"], guidance=DEFAULTS["sample_guidance"]))
    seed: int | None = None  # None: the runner draws a new one for each round
    uncertainty_penalty: float = DEFAULTS["uncertainty_penalty"]  # lambda in r - lambda * spread
    patience: int = DEFAULTS["patience"]  # early stop on the penalised reward (0: off)
    fidelity_weight: float = DEFAULTS["fidelity_weight"]  # w in reward + w * fidelity
    fidelity_threshold: float = DEFAULTS["fidelity_threshold"]  # the guard's allowed drop (0: off)
    fidelity_check_every: int = DEFAULTS["fidelity_check_every"]  # in-round probe interval (0: off)

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] = DEFAULTS) -> RoundConfig:
        """A round's configuration from the public form, every value checked; what ``raw`` leaves
        out comes from ``defaults`` (the model's: :func:`defaults_for`)."""
        raw = {} if raw is None else raw
        if not isinstance(raw, Mapping):
            raise AppError("the round settings must be an object of name: value pairs")
        unknown = sorted(str(k) for k in raw if k not in DEFAULTS)
        if unknown:
            raise AppError(f"unknown round setting(s): {', '.join(unknown)}; the settings are "
                           f"{', '.join(DEFAULTS)}")
        v = _check_values(raw, defaults)
        training = TrainConfig(
            estimator=_estimator(v), steps=v["steps"], batch=v["batch_size"], lr=v["learning_rate"],
            lora_rank=v["lora_rank"], sampler=SamplerSettings(steps=v["sampling_steps"], eta=1.0,
                                                              guidance=v["guidance"]))
        return cls(training=training, max_prompts=v["max_prompts"], samples_per_prompt=v["samples_per_prompt"],
                   samples=SamplerSettings(steps=v["sample_steps"], guidance=v["sample_guidance"]),
                   seed=v["seed"], uncertainty_penalty=v["uncertainty_penalty"], patience=v["patience"],
                   fidelity_weight=v["fidelity_weight"], fidelity_threshold=v["fidelity_threshold"],
                   fidelity_check_every=v["fidelity_check_every"])

    @property
    def estimator(self) -> str:
        return self.training.estimator.name

    def public(self) -> dict[str, Any]:
        """The flat form :meth:`parse` reads (settings an estimator does not take show their defaults)."""
        t, opts = self.training, self.training.estimator.options
        return {
            "estimator": t.estimator.name, "steps": t.steps, "batch_size": t.batch,
            "sampling_steps": t.sampler.steps, "learning_rate": t.lr, "lora_rank": t.lora_rank,
            "block": opts.get("block", DEFAULTS["block"]), "rest": opts.get("rest", DEFAULTS["rest"]),
            "truncation": opts["steps"] if t.estimator.name == "truncated-bp" else DEFAULTS["truncation"],
            "max_prompts": self.max_prompts, "guidance": t.sampler.guidance,
            "samples_per_prompt": self.samples_per_prompt, "sample_steps": self.samples.steps,
            "sample_guidance": self.samples.guidance, "seed": self.seed,
            "uncertainty_penalty": self.uncertainty_penalty, "patience": self.patience,
            "kl_coef": opts.get("kl_coef", 0.0), "fidelity_weight": self.fidelity_weight,
            "fidelity_threshold": self.fidelity_threshold, "fidelity_check_every": self.fidelity_check_every,
        }

    def for_round(self, prompts: Sequence[str], stage_prompts: dict[str, list[str]] | None, seed: int,
                  boundaries: Sequence[float], window: tuple[int, int] | None) -> TrainConfig:
        """What ``rlr_core.training.run_round`` runs: this round's prompts, stages, seed and window."""
        estimator = self.training.estimator
        if window is not None:  # DCoT: RLR draws its HO block inside the focus stage
            estimator = EstimatorConfig(estimator.name, {**estimator.options, "window": tuple(window)})
        return dataclasses.replace(self.training, estimator=estimator, prompts=list(prompts),
                                   stage_prompts=stage_prompts or None, stage_boundaries=tuple(boundaries),
                                   seed=seed)
