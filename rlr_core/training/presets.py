"""Named training presets: an estimator with its settings plus the sampler settings it was
published with. One so far, the authors' released recipe, for comparison; it is BIASED
(docs/method.md section 7)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlr_core.estimators.authors_code import SAMPLER_ETA, AuthorsCode
from rlr_core.training.round import EstimatorConfig, TrainConfig


@dataclass(frozen=True)
class Preset:
    estimator: EstimatorConfig
    eta: float  # the sampler's eta the recipe was published with
    biased: bool
    summary: str


def _authors_code() -> Preset:
    defaults = AuthorsCode()
    options = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(AuthorsCode) if f.name != "kl_coef"}
    return Preset(EstimatorConfig(AuthorsCode.name, options), SAMPLER_ETA, biased=True,
                  summary="the authors' released recipe (BIASED): eta 0.05, truncated backprop through the last "
                  "step plus a PPO-clipped chain of 2 steps on the whitened batch reward weighted 1e-3, "
                  "as separate FO and HO updates; no term for the other steps")


PRESETS: dict[str, Preset] = {"authors-code": _authors_code()}


def apply_preset(config: TrainConfig, name: str) -> TrainConfig:
    """``config`` with the preset's estimator and sampler eta (everything else unchanged)."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    sampler = dataclasses.replace(config.sampler, eta=preset.eta)
    estimator = EstimatorConfig(preset.estimator.name, dict(preset.estimator.options))
    return dataclasses.replace(config, estimator=estimator, sampler=sampler)
