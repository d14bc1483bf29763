"""The authors' released recipe, as a labelled preset for comparison. BIASED (docs/method.md
section 7; written from the published script's settings, none of its code):

    FO  = truncated backprop through the last ``fo_steps`` steps (their script: 1)
    HO  = ho_coef * PPO-clipped ratio at the last step of a chain of ``chain_len`` steps (graph kept
          through the chain, its inner noise fixed) at a random place in the chain, on the batch
          reward whitened (R - mean) / std and clipped to +-adv_clip
    no term for the other steps; FO and HO are separate optimiser steps on one batch

Sampling uses eta = 0.05 in their script (``SAMPLER_ETA``, set by the ``authors-code`` training
preset; the estimator itself runs on whatever chain it is given). Every step outside the FO
tail and the chain is dropped, and the HO term is scaled down 1000x, so in practice this is
truncated backprop plus a small RL term. The per-batch whitening also makes it biased.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.common import Estimate, Estimator, deterministic_tail, fo_backward, mean_with_graph, pathwise
from rlr_core.estimators.ddpo import clipped_surrogate, log_ratio
from rlr_core.estimators.kl import KL_STEPS, kl_coef_option, kl_term
from rlr_core.rollout import Trajectory

SAMPLER_ETA = 0.05  # their script's sample_eta


@dataclass
class AuthorsCode(Estimator):
    fo_steps: int = 1  # truncated backprop through the last step
    chain_len: int = 2  # the "half-order" chain
    ho_coef: float = 1e-3  # their script's ho_loss_coeff
    clip_range: float = 1e-4  # PPO clip of the ratio
    adv_clip: float = 5.0  # whitened advantages clipped to +-adv_clip
    kl_coef: float = kl_coef_option()  # the KL regulariser to the round's parent (rlr_core/estimators/kl.py)
    kl_steps: int | None = KL_STEPS  # the KL's gradient at this many random steps (None: every step)
    name: ClassVar[str] = "authors-code"
    biased: ClassVar[bool] = True

    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate:
        """FO and HO gradients of one batch, both at the current weights (what the two separate
        optimiser steps of :meth:`step` start from), summed."""
        batch = self._collect(chain, ctx, generator)
        fo = self._fo(chain, ctx, batch)
        ho = self._ho(chain, ctx, batch)
        return Estimate(batch[1], fo.loss + ho.loss, {**fo.stats, **ho.stats})

    def step(self, chain: Chain, ctx: ChainContext, generator: torch.Generator,
             optimizer_step: Callable[[], float], zero_grad: Callable[[], None],
             check: Callable[[Estimate], None] | None = None) -> Estimate:
        """One batch, two optimiser steps: FO first, then HO (their "separate backward")."""
        batch = self._collect(chain, ctx, generator)
        zero_grad()
        fo = self._fo(chain, ctx, batch)
        if check is not None:
            check(fo)
        fo.stats["grad_norm"] = optimizer_step()
        zero_grad()
        ho = self._ho(chain, ctx, batch)
        if check is not None:
            check(ho)
        fo.stats["ho_grad_norm"] = optimizer_step()
        fo.stats.update({k: v for k, v in ho.stats.items() if k != "grad_norm"})
        fo.loss += ho.loss
        return fo

    def _collect(self, chain: Chain, ctx: ChainContext,
                 generator: torch.Generator) -> tuple[Trajectory, torch.Tensor, torch.Tensor]:
        traj = chain.rollout(ctx, generator)
        with torch.no_grad():
            R = chain.reward(traj.x0, ctx).detach()
        tail = max(self.fo_steps, deterministic_tail(chain.sigma))
        lo, hi = tail + 1, chain.num_steps - self.chain_len + 1
        if hi < lo:
            raise ValueError(f"no chain of {self.chain_len} steps fits above the FO tail ({tail}) "
                             f"in K={chain.num_steps}")
        starts = torch.randint(lo, hi + 1, (ctx.batch,), generator=generator)
        return traj, R, starts

    def _fo(self, chain: Chain, ctx: ChainContext, batch: tuple) -> Estimate:
        traj, R, _ = batch
        tail = max(self.fo_steps, deterministic_tail(chain.sigma))
        fo_backward(chain, ctx, traj, tail)
        loss = -float(R.mean())
        stats = {}
        loss += kl_term(chain, ctx, traj, self.kl_coef, self.kl_steps, stats)  # subset: the global generator
        return Estimate(R, loss, stats)

    def _ho(self, chain: Chain, ctx: ChainContext, batch: tuple) -> Estimate:
        traj, R, starts = batch
        A = (R - R.mean()) / (R.std() + 1e-8) if len(R) > 1 else R - R  # whitened batch reward
        A = A.clamp(-self.adv_clip, self.adv_clip)
        rows = torch.arange(ctx.batch)
        top = starts + self.chain_len - 1
        x = pathwise(chain, ctx, traj.x[top, rows].detach(), top, noise=traj.noise, steps=self.chain_len - 1)
        m = mean_with_graph(chain, x, starts, ctx)
        ratio = torch.exp(log_ratio(m, traj.mean[starts, rows], traj.noise[starts, rows], chain.sigma[starts].to(m)))
        per_row, outside = clipped_surrogate(ratio, A.to(m), self.clip_range)
        loss = self.ho_coef * per_row.mean()
        loss.backward()
        return Estimate(R, float(loss.detach()), {"clip_fraction": outside / len(ratio)})
