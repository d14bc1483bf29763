"""A training round's state between two pieces of work, so a round can pause and go on elsewhere.

``run_round(..., budget_s=...)`` stops after a time budget and returns a :class:`RoundState`;
``run_round(..., resume=state)`` continues from it and takes exactly the steps the round would
have taken without the pause (same weights, optimiser moments, random draws, estimator
calibration). Every tensor in a state lives on the CPU and the state pickles, so it can cross
process boundaries: a ZeroGPU worker gets it as an argument and returns the next one
(:mod:`rlr_core.training.chunked`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from rlr_core.estimators import Estimator


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor detached on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


@dataclass
class RoundState:
    step: int  # optimiser steps done (the next step's index)
    params: list[torch.Tensor]  # the trainable weights, in trainable_parameters' order
    optimizer: dict  # optimizer.state_dict()
    generator: torch.Tensor  # the round's sampling generator (CPU)
    rng: tuple  # the round's random.Random (prompt draws)
    torch_rng: torch.Tensor  # torch's global CPU generator
    history: list[dict]  # one row per step so far
    elapsed: float  # seconds of training so far (pauses not counted)
    grad_norms: list[float]  # the divergence guard's running record
    estimator: Estimator  # carries calibrations (RLR's grad-norm block start, auto block sizes)
    reference: list[torch.Tensor] | None = None  # the KL's reference weights (the round's parent)

    @classmethod
    def capture(cls, step: int, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                generator: torch.Generator, rng: random.Random, history: list[dict], elapsed: float,
                grad_norms: list[float], estimator: Estimator,
                reference: list[torch.Tensor] | None = None) -> RoundState:
        return cls(step=step, params=[to_cpu(p) for p in params], optimizer=to_cpu(optimizer.state_dict()),
                   generator=generator.get_state().clone(), rng=rng.getstate(),
                   torch_rng=torch.get_rng_state().clone(), history=[dict(r) for r in history],
                   elapsed=elapsed, grad_norms=list(grad_norms), estimator=estimator,
                   reference=None if reference is None else [to_cpu(r) for r in reference])

    @torch.no_grad()
    def restore(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                generator: torch.Generator, rng: random.Random) -> None:
        """Put the weights, optimiser and random generators back as they were at capture."""
        if len(params) != len(self.params) or any(p.shape != s.shape for p, s in zip(params, self.params)):
            raise ValueError("the saved round state does not fit this model's trainable weights")
        for p, saved in zip(params, self.params):
            p.copy_(saved.to(p.device, p.dtype))
        optimizer.load_state_dict(self.optimizer)  # moves the moments to the parameters' device
        generator.set_state(self.generator)
        rng.setstate(self.rng)
        torch.set_rng_state(self.torch_rng)
