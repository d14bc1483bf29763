"""Prompt groups with shared initial noise (docs/method.md section 2, "Prompt groups").

With ``group_size`` = G, a batch of B rows is B/G prompts (drawn at random without replacement
from the batch handed in, so every prompt of it is equally likely) each repeated G times, and
the G rows of a group start from the same x_K. Every row then draws its own noise eps_k at every
step, and its likelihood-ratio terms use the leave-one-out mean of its own group.
Unbiased: row b's step-k term is (R_b - beta_b) grad log p(x_{k-1,b} | x_{k,b});
beta_b depends only on the other rows of the group (the shared x_K and their own noise), so
given x_K, row b's earlier noise and the other rows, eps_{k,b} is still a fresh N(0, I) draw and
E[grad log p | all that] = 0. Sharing x_K is what makes the group baseline good (the rows differ
only in the noise the terms credit); sharing any eps_k would break this, because the baseline
would then see the very noise the term's score is made of.
"""

from __future__ import annotations

import torch

from rlr_core.estimators.chain import Chain, ChainContext


def group_batch(chain: Chain, ctx: ChainContext, generator: torch.Generator,
                group_size: int) -> tuple[ChainContext, torch.Tensor, torch.Tensor]:
    """(the grouped context, the shared x_K per row, the group id per row) for a batch of B rows."""
    B, G = ctx.batch, group_size
    if G < 1 or B % G:
        raise ValueError(f"group_size {G} must divide the batch ({B})")
    prompts = torch.randperm(B, generator=generator)[:B // G].sort().values
    peers = torch.arange(B // G).repeat_interleave(G)
    x_K = chain.initial(ctx.take(prompts), generator).repeat_interleave(G, dim=0)
    return ctx.take(prompts[peers]), x_K, peers
