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

The estimator options among the settings (``block``, ``rest``, ``truncation``, ``kl_coef``) are
checked by, and turned into the chosen estimator's options with, the estimators' own schemas
(rlr_core/estimators/schema.py); each model's defaults are rlr_core/training/defaults.py's table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app import validate as check
from app.errors import AppError
from app.fidelity_guard import FIDELITY_RULES
from rlr_core.backends.base import DiffusionBackend
from rlr_core.estimators import ESTIMATORS
from rlr_core.estimators.schema import OptionError, from_public, takes, to_public
from rlr_core.sampler import SamplerSettings
from rlr_core.training import EstimatorConfig, TrainConfig
from rlr_core.training.defaults import (  # noqa: F401  (re-exported: the table lives in rlr_core)
    ANCHOR_ROWS,
    BUILTIN_IMAGE_DEFAULTS,
    BUILTIN_IMAGE_PICK,
    DEFAULTS,
    FAMILY_DEFAULTS,
    LATENT_PICK,
    PUBLIC_OPTIONS,
    SD3_PICK,
    SDXL_PICK,
    defaults_for,
)
from rlr_core.training.round import KL_REFERENCES

ESTIMATOR_CHOICES = [("RLR", "rlr"), ("DDPO", "ddpo"), ("Truncated backprop", "truncated-bp"),
                     ("Full backprop", "full-bp")]
DEFAULT_NOTES: dict[str, str] = {
    "builtin-image": ("The default here is RLR with a fidelity term and a KL to the round's parent, 10 steps at batch "
                      "6: in the app's own loop (a reward proxy learnt from ratings, judged from the pixels), one "
                      "round of truncated backprop, full backprop or RLR without those two terms raised the rater's "
                      "score fastest but lost prompt fidelity and image quality, and the guard rejected it; with "
                      "them, only RLR also raised the score. RLR's rounds can still lose fidelity over several "
                      "rounds: the guard is what stops it. It probes the round's prompts and 24 prompts nobody "
                      "rated and reads a drop over every attribute they name. Over four rounds, 3 seeds x 2 tastes, "
                      "judged from the pixels, the first round raised the rater's score by 3 standard errors on 5 "
                      "runs of 6, fidelity held within 0.05 at every round on 4 of 6, and the guard flagged 10 of "
                      "the 13 versions that lost fidelity (the three it missed lost 0.053-0.064; read again on fresh "
                      "noise, two lost about 0.07) and 3 of the 11 "
                      "that did not (docs/benchmarks.md, the loop). The earlier rule, 8 prompts nobody rated judged "
                      "apart from the rated ones, missed fewer losses (2 of 15) but held back 4 of 9 faithful "
                      "versions, and the first round moved the score on 1 run of 6. Scaling a flagged round back "
                      "toward its parent until the guard passes it (Fidelity back-off) let more losses go live, so "
                      "it is off."),
}
OTHER_NOTE = ("The default here is RLR, the method this app is built around; the loop benchmark has not been run on "
              "this model.")


def defaults_note(backend: DiffusionBackend) -> str:
    """One sentence for the Train tab: why its default estimator is the default on this model."""
    return DEFAULT_NOTES.get(backend.family, OTHER_NOTE)


def _option(key: str, value: Any) -> Any:
    """An estimator option of the flat settings checked by its schema (rlr_core/estimators/schema.py)."""
    try:
        return PUBLIC_OPTIONS[key][0].check(value)
    except OptionError as err:
        raise AppError(str(err)) from None


def _check_values(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every public setting checked (missing or empty ones take their defaults)."""
    get = lambda k: raw[k] if raw.get(k) not in (None, "") else defaults[k]
    v = {
        "estimator": check.choice(get("estimator"), "estimator", [v for _, v in ESTIMATOR_CHOICES]),
        "steps": check.whole(get("steps"), "optimiser steps", 1, 2000),
        "batch_size": check.whole(get("batch_size"), "batch size", 2, 256),
        "sampling_steps": check.whole(get("sampling_steps"), "sampling steps", 3, 200),
        "learning_rate": check.real(get("learning_rate"), "learning rate", 1e-7, 1.0),
        "lora_rank": check.whole(get("lora_rank"), "LoRA rank", 1, 256),
        "max_prompts": check.whole(get("max_prompts"), "prompts per round", 1, 64),
        "guidance": check.real(get("guidance"), "guidance", 1.0, 20.0),
        "samples_per_prompt": check.whole(get("samples_per_prompt"), "samples per prompt", 1, 16),
        "sample_steps": check.whole(get("sample_steps"), "sample steps", 2, 200),
        "sample_guidance": check.real(get("sample_guidance"), "sample guidance", 1.0, 20.0),
        "seed": None if raw.get("seed") in (None, "") else check.whole(raw["seed"], "seed", 0, 2**31 - 1),
        "uncertainty_penalty": check.real(get("uncertainty_penalty"), "uncertainty penalty", 0.0, 100.0),
        "patience": check.whole(get("patience"), "patience", 0, 2000),
        "fidelity_weight": check.real(get("fidelity_weight"), "fidelity weight", 0.0, 1000.0),
        "kl_reference": check.choice(get("kl_reference"), "KL reference", KL_REFERENCES),
        "anchor_kl": check.real(get("anchor_kl"), "anchor KL coefficient", 0.0, 1000.0),
        "anchor_fidelity": check.real(get("anchor_fidelity"), "anchor fidelity weight", 0.0, 1000.0),
        "fidelity_threshold": check.real(get("fidelity_threshold"), "fidelity threshold", 0.0, 1.0),
        "fidelity_check_every": check.whole(get("fidelity_check_every"), "fidelity check interval", 0, 2000),
        "fidelity_backoff": check.whole(get("fidelity_backoff"), "fidelity back-off halvings", 0, 6),
        "fidelity_probe_images": check.whole(get("fidelity_probe_images"), "fidelity probe images", 1, 16),
        "fidelity_probe_prompts": check.whole(get("fidelity_probe_prompts"), "fidelity probe prompts", 4, 64),
        "fidelity_rule": check.choice(get("fidelity_rule"), "fidelity rule", FIDELITY_RULES),
        "normalize_reward": check.flag(get("normalize_reward"), "normalize reward"),
    }
    return {**v, **{key: _option(key, get(key)) for key in PUBLIC_OPTIONS}}


def _estimator(v: dict[str, Any]) -> EstimatorConfig:
    """The chosen estimator with the options it takes (and only those), from its schema."""
    return EstimatorConfig(v["estimator"], from_public(ESTIMATORS[v["estimator"]], v, v["sampling_steps"]))


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
    anchor_fidelity: float = DEFAULTS["anchor_fidelity"]  # w_a: the anchor rows' reward per unit of fidelity
    fidelity_threshold: float = DEFAULTS["fidelity_threshold"]  # the guard's allowed drop (0: off)
    fidelity_check_every: int = DEFAULTS["fidelity_check_every"]  # in-round probe interval (0: off)
    fidelity_backoff: int = DEFAULTS["fidelity_backoff"]  # halvings of a flagged round's change to try (0: off)
    fidelity_probe_images: int = DEFAULTS["fidelity_probe_images"]  # the guard's images per probe prompt
    fidelity_probe_prompts: int = DEFAULTS["fidelity_probe_prompts"]  # the guard's probe prompts, at most
    fidelity_rule: str = DEFAULTS["fidelity_rule"]  # how the guard reads a drop (FIDELITY_RULES)
    normalize_reward: bool = DEFAULTS["normalize_reward"]  # the proxy's reward in units of its spread on rated images

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
                                                              guidance=v["guidance"]),
            anchor_kl=v["anchor_kl"], kl_reference=v["kl_reference"],
            anchor_rows=ANCHOR_ROWS if v["anchor_fidelity"] else 0)
        return cls(training=training, max_prompts=v["max_prompts"], samples_per_prompt=v["samples_per_prompt"],
                   samples=SamplerSettings(steps=v["sample_steps"], guidance=v["sample_guidance"]),
                   seed=v["seed"], uncertainty_penalty=v["uncertainty_penalty"], patience=v["patience"],
                   fidelity_weight=v["fidelity_weight"], anchor_fidelity=v["anchor_fidelity"],
                   fidelity_threshold=v["fidelity_threshold"],
                   fidelity_check_every=v["fidelity_check_every"], fidelity_backoff=v["fidelity_backoff"],
                   fidelity_probe_images=v["fidelity_probe_images"],
                   fidelity_probe_prompts=v["fidelity_probe_prompts"], fidelity_rule=v["fidelity_rule"],
                   normalize_reward=v["normalize_reward"])

    @property
    def estimator(self) -> str:
        return self.training.estimator.name

    @property
    def takes_window(self) -> bool:
        """Whether the estimator can draw its HO block inside a DCoT stage's window."""
        return takes(ESTIMATORS[self.estimator], "window")

    def public(self) -> dict[str, Any]:
        """The flat form :meth:`parse` reads (settings an estimator does not take show their defaults)."""
        t = self.training
        values = {
            "estimator": t.estimator.name, "steps": t.steps, "batch_size": t.batch,
            "sampling_steps": t.sampler.steps, "learning_rate": t.lr, "lora_rank": t.lora_rank,
            "max_prompts": self.max_prompts, "guidance": t.sampler.guidance,
            "samples_per_prompt": self.samples_per_prompt, "sample_steps": self.samples.steps,
            "sample_guidance": self.samples.guidance, "seed": self.seed,
            "uncertainty_penalty": self.uncertainty_penalty, "patience": self.patience,
            "fidelity_weight": self.fidelity_weight, "kl_reference": t.kl_reference, "anchor_kl": t.anchor_kl,
            "anchor_fidelity": self.anchor_fidelity,
            "fidelity_threshold": self.fidelity_threshold,
            "fidelity_check_every": self.fidelity_check_every, "fidelity_backoff": self.fidelity_backoff,
            "fidelity_probe_images": self.fidelity_probe_images,
            "fidelity_probe_prompts": self.fidelity_probe_prompts, "fidelity_rule": self.fidelity_rule,
            "normalize_reward": self.normalize_reward,
            **to_public(ESTIMATORS[t.estimator.name], t.estimator.options),
        }
        return {key: values.get(key, DEFAULTS[key]) for key in DEFAULTS}

    def for_round(self, prompts: Sequence[str], stage_prompts: dict[str, list[str]] | None, seed: int,
                  boundaries: Sequence[float], window: tuple[int, int] | None) -> TrainConfig:
        """What ``rlr_core.training.run_round`` runs: this round's prompts, stages, seed and window."""
        estimator = self.training.estimator
        if window is not None and self.takes_window:  # DCoT: RLR draws its HO block inside the focus stage
            estimator = EstimatorConfig(estimator.name, {**estimator.options, "window": tuple(window)})
        return dataclasses.replace(self.training, estimator=estimator, prompts=list(prompts),
                                   stage_prompts=stage_prompts or None, stage_boundaries=tuple(boundaries),
                                   seed=seed)
