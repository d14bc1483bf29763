"""Truncated backpropagation (AlignProp / DRaFT-K, method doc section 4).

Sample x_K .. x_{K'} without a graph, then keep the graph only through the last K' steps:

    g = dR(x_0)/dtheta  restricted to steps K' .. 1

Biased: every earlier step's contribution to grad J is dropped. With ``randomize`` K' is drawn
uniformly from 1..K' per call (AlignProp's randomised truncation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.common import Estimate, Estimator, pathwise
from rlr_core.estimators.kl import KL_STEPS, kl_coef_option, kl_term, replay
from rlr_core.estimators.schema import option


@dataclass
class TruncatedBackprop(Estimator):
    steps: int = option(1, label="last K' steps", low=1, high=200, public="truncation", flag="truncate",
                        chain_steps=True, help="K': how many final steps keep the graph")
    randomize: bool = option(False, label="randomised truncation", flag="randomize-truncation",
                             help="K' drawn from 1..K' at every step (AlignProp)")
    use_checkpoint: bool = True
    kl_coef: float = kl_coef_option()  # the KL regulariser to the round's parent (rlr_core/estimators/kl.py)
    kl_steps: int | None = KL_STEPS  # the KL's gradient at this many random steps (None: every step)
    name: ClassVar[str] = "truncated-bp"

    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate:
        K = chain.num_steps
        kept = min(self.steps, K)
        if self.randomize:
            kept = int(torch.randint(1, kept + 1, (), generator=generator))
        state = generator.get_state() if self.kl_coef else None
        traj = chain.rollout(ctx, generator, until=kept)
        x0 = pathwise(chain, ctx, traj.x[kept], kept, generator=generator, use_checkpoint=self.use_checkpoint)
        R = chain.reward(x0, ctx)
        loss = -R.mean()
        loss.backward()
        stats = {"kept_steps": kept}
        kl = 0.0
        if state is not None:  # along the same trajectory, re-sampled without a graph
            kl = kl_term(chain, ctx, replay(chain, ctx, state), self.kl_coef, self.kl_steps, stats, generator)
        return Estimate(R.detach(), float(loss.detach()) + kl, stats)
