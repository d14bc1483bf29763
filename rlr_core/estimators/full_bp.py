"""Full backpropagation through the whole chain: the exact pathwise gradient (method doc section 4).

    grad J = E[ dR(x_0)/dtheta ],  x_0 = x_0(theta; x_K, eps_K..eps_1) with all noise held fixed

Memory is kept flat by checkpointing each denoiser call (only x_k is stored per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.common import Estimate, Estimator, pathwise
from rlr_core.estimators.kl import KL_STEPS, kl_coef_option, kl_term, replay


@dataclass
class FullBackprop(Estimator):
    use_checkpoint: bool = True
    kl_coef: float = kl_coef_option()  # the KL regulariser to the round's parent (rlr_core/estimators/kl.py)
    kl_steps: int | None = KL_STEPS  # the KL's gradient at this many random steps (None: every step)
    name: ClassVar[str] = "full-bp"

    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate:
        state = generator.get_state() if self.kl_coef else None
        x_K = chain.initial(ctx, generator)
        x0 = pathwise(chain, ctx, x_K, chain.num_steps, generator=generator, use_checkpoint=self.use_checkpoint)
        R = chain.reward(x0, ctx)
        loss = -R.mean()
        loss.backward()
        stats = {}
        kl = 0.0
        if state is not None:  # along the same trajectory, re-sampled without a graph
            kl = kl_term(chain, ctx, replay(chain, ctx, state), self.kl_coef, self.kl_steps, stats, generator)
        return Estimate(R.detach(), float(loss.detach()) + kl, stats)
