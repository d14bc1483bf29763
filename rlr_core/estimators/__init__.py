"""Gradient estimators for E[R(x_0)] over a stochastic diffusion sampler.

Each estimator is one small module citing the formula of docs/method.md it implements, and
each works on any :class:`~rlr_core.estimators.chain.Chain` (the UNet backends and the toy chain).
``accumulate(chain, ctx, generator)`` adds an estimate of -grad J into ``.grad``;
``step(chain, ctx, generator, optimizer_step, zero_grad)`` is one training step with it (DDPO's
takes several optimiser steps per batch). Each estimator's dataclass is the one schema of its
options (:mod:`.schema`): the app's round settings and the command line's flags come from it.
"""

from __future__ import annotations

from rlr_core.estimators.authors_code import AuthorsCode
from rlr_core.estimators.chain import Chain, ChainContext, ZOPerturbation
from rlr_core.estimators.common import Estimate, Estimator, leave_one_out
from rlr_core.estimators.ddpo import DDPO
from rlr_core.estimators.full_bp import FullBackprop
from rlr_core.estimators.likelihood_ratio import LikelihoodRatio
from rlr_core.estimators.rlr import RLR
from rlr_core.estimators.truncated_bp import TruncatedBackprop

ESTIMATORS: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (RLR, FullBackprop, TruncatedBackprop, LikelihoodRatio, DDPO, AuthorsCode)
}


def make_estimator(name: str, **settings) -> Estimator:
    """An estimator by name ("rlr", "full-bp", "truncated-bp", "lr", "ddpo"; "authors-code", the
    authors' released recipe, biased) with its settings."""
    try:
        cls = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}") from None
    return cls(**settings)


__all__ = [
    "AuthorsCode", "Chain", "ChainContext", "ZOPerturbation", "Estimate", "Estimator", "leave_one_out", "DDPO",
    "FullBackprop", "LikelihoodRatio", "RLR", "TruncatedBackprop", "ESTIMATORS", "make_estimator",
]
