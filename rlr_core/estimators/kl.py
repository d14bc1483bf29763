"""The exact KL regulariser, an option of every estimator (docs/method.md section 2).

The reference is the round's parent (``BackendChain.set_reference``: the adapter as the round
found it; for the first round that is the base model), or the base model itself. Each step is
Gaussian with the same sigma_k under the adapted and the reference model, so the KL between
their step distributions at a state x_k is exact and closed-form:

    KL_k(x_k) = ||mu_theta(x_k, k, c) - mu_ref(x_k, k, c)||^2 / (2 sigma_k^2)
    KL        = (1/B) sum_b sum_{k: sigma_k > 0} KL_k(x_{k,b})   along the sampled trajectories

Steps with sigma_k = 0 (DDIM's deterministic final step) are skipped: two point masses at
different means have infinite KL, and nothing stochastic happens there to regularise.
With ``kl_coef`` = beta the estimators maximise J - beta KL: they add beta * grad KL (the states
x_k held fixed, as Flow-GRPO's per-step KL does) to the -grad J they accumulate.
"""

from __future__ import annotations

from typing import Any

import torch

from rlr_core.estimators.chain import Chain, ChainContext
from rlr_core.estimators.schema import option
from rlr_core.rollout import Trajectory


def step_kl(chain: Chain, ctx: ChainContext, traj: Trajectory, k: int,
            reference: torch.Tensor | None = None) -> torch.Tensor:
    """KL_k(x_k) per row (B,), differentiable in theta; x_k taken from ``traj`` (detached).
    ``reference``: mu_ref at x_k when already computed."""
    x = traj.x[k].detach()
    if reference is None:  # before the graph of mu: the reference swaps weights in place
        reference = chain.reference_mean(x, k, ctx)
    mu = chain.mean(x, k, ctx)
    return ((mu - reference.detach()) ** 2).flatten(1).sum(1) / (2 * float(chain.sigma[k]) ** 2)


def stochastic_steps(chain: Chain) -> list[int]:
    """The steps the KL covers: sigma_k > 0 (see the module docstring)."""
    return [k for k in range(1, chain.num_steps + 1) if float(chain.sigma[k]) > 0]


def kl_to_reference(chain: Chain, ctx: ChainContext, traj: Trajectory) -> torch.Tensor:
    """sum_k KL_k(x_k) per row (B,), differentiable in theta. Every reference mean is computed
    before any graph is built (the reference swaps the trainable weights in place)."""
    ks = stochastic_steps(chain)
    references = {k: chain.reference_mean(traj.x[k].detach(), k, ctx) for k in ks}
    return sum((step_kl(chain, ctx, traj, k, references[k]) for k in ks),
               torch.zeros(ctx.batch, dtype=traj.x.dtype, device=traj.x.device))


# Steps the KL's gradient is taken at per estimate: a uniform random subset of the stochastic
# steps, each scaled by (stochastic steps) / (subset size), so its expectation is the full sum's
# gradient. Every step costs a reference and a denoiser call and a backward; on the built-in
# model the full sum over 10 steps made a truncated-BP step about 5x slower. None: every step.
KL_STEPS = 2


def kl_coef_option() -> Any:
    """Every estimator's ``kl_coef`` field: one declaration, so the app and the CLI treat it alike.
    Implicit: rounds stored before the KL existed have no ``kl_coef``, and 0 is still left out."""
    return option(0.0, label="KL coefficient β", low=0.0, high=1000.0, public=True, implicit=True,
                  help="exact per-step KL of the sampler to the round's parent (the base model at first); 0 = off")


def kl_backward(chain: Chain, ctx: ChainContext, traj: Trajectory, coef: float,
                steps: int | None = KL_STEPS, generator: torch.Generator | None = None) -> float:
    """Add coef * grad KL into ``.grad`` (the regulariser's share of the estimate); returns the
    estimate of KL. ``steps``: the size of the random subset of steps (see ``KL_STEPS``); drawn
    from ``generator`` (default: torch's global one, seeded by the round). One backward per step,
    so one denoiser graph is alive at a time."""
    if coef == 0:
        return 0.0
    ks = stochastic_steps(chain)
    scale = 1.0
    if steps is not None and steps < len(ks):
        pick = torch.randperm(len(ks), generator=generator)[:steps].sort().values
        scale, ks = len(ks) / steps, [ks[int(i)] for i in pick]
    total = 0.0
    for k in ks:
        kl = scale * step_kl(chain, ctx, traj, k).mean()
        (coef * kl).backward()
        total += float(kl.detach())
    return total


def kl_term(chain: Chain, ctx: ChainContext, traj: Trajectory, coef: float, steps: int | None,
            stats: dict, generator: torch.Generator | None = None) -> float:
    """Every estimator's KL epilogue: :func:`kl_backward` when ``coef`` > 0, the estimate recorded
    in ``stats["kl"]``; returns coef * KL, the term's share of the reported loss (0 when off)."""
    if not coef:
        return 0.0
    stats["kl"] = kl_backward(chain, ctx, traj, coef, steps, generator)
    return coef * stats["kl"]


def replay(chain: Chain, ctx: ChainContext, generator_state: torch.Tensor) -> Trajectory:
    """The trajectory an estimator that does not record one (full or truncated BP) sampled from
    ``generator_state``: the same draws in the same order, recorded without a graph."""
    gen = torch.Generator("cpu")
    gen.set_state(generator_state)
    return chain.rollout(ctx, gen)


# Prior preservation: rows per optimiser step drawn from the model's anchor prompts.
ANCHOR_BATCH = 4


def anchor_kl_backward(chain: Chain, ctx: ChainContext, coef: float, generator: torch.Generator,
                       steps: int | None = KL_STEPS) -> float:
    """Prior preservation (docs/method.md section 2): add coef * grad KL into ``.grad`` along chains
    the adapter samples now for ``ctx``, prompts the round does not train on (a backend's
    ``anchor_prompts``: every attribute named, so the rater's taste has nothing left to change in
    them). The round's own KL holds each step near the parent on its prompts; this one does so
    where the rater never looked, which is where a low-rank change leaks. Returns the KL."""
    if coef == 0:
        return 0.0
    return kl_backward(chain, ctx, chain.rollout(ctx, generator), coef, steps, generator)
