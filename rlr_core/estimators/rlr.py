"""The Recursive Likelihood Ratio estimator (method doc section 3).

Per trajectory, with the FO tail covering steps L..1, one HO block covering steps j+h-1..j, and
the rest of the chain C = {L+1..K} minus the block:

    G = FO(steps L..1) + HO(block j+h-1..j) + sum_{i in C} REST(step i)

    FO   = dR(x_0)/dtheta through steps L..1, from the recorded x_L           (doc section 2, FO)
    HO   = (R - b) (d m_theta/d theta)^T (x_{j-1} - m_theta) / sigma_j^2,      (doc section 2, HO)
           m_theta = mu_theta(x_j(theta), j, c), x_j(theta) run from x_{j+h-1} with its noise fixed
    REST = "lr":   (R - b) grad log p_theta(x_{i-1} | x_i), optionally m random steps x |C|/m
           "zo":   (R - b) delta_i / s^2, x sampled with theta + delta_i at step i
           "none": 0 (biased; for ablations)

Every step's theta-dependence is credited exactly once, so G is unbiased for every fixed j
(paper Thm 6.3): any distribution of j (uniform, gradient-norm weighted, a DCoT window) keeps it
unbiased without reweighting. "zo" is unbiased for the parameter-smoothed objective.

Options that keep it unbiased (doc section 2): ``baseline`` (what R is compared with),
``branches`` (M continuations of the HO block), ``control_variate="taylor"`` (the HO and "lr"
terms become (R - b - <a, x_{k-1} - mu>) grad log p + (d mu/d theta)^T a, see
:mod:`.control_variate`), ``group_size`` (prompt groups sharing x_K, :mod:`.groups`); and
``kl_coef`` (the KL regulariser to the round's parent, :mod:`.kl`), which changes the objective on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from rlr_core.estimators.baselines import Baseline
from rlr_core.estimators.chain import Chain, ChainContext, ZOPerturbation
from rlr_core.estimators.common import (
    Estimate,
    Estimator,
    deterministic_tail,
    fo_backward,
    fo_tail_length,
    leave_one_out,
    log_prob_terms,
    lr_backward,
    mean_with_graph,
    pathwise,
)
from rlr_core.estimators.control_variate import pair_advantages, taylor_advantages
from rlr_core.estimators.groups import group_batch
from rlr_core.estimators.kl import KL_STEPS, kl_coef_option, kl_term
from rlr_core.estimators.memory import auto_block_size, default_budget, measure_step_memory
from rlr_core.estimators.schema import option
from rlr_core.rollout import Prediction, Trajectory, draw_noise, rollout

Rest = Literal["lr", "zo", "none"]
ControlVariate = Literal["none", "taylor"]


@dataclass
class RLR(Estimator):
    block: int | Literal["auto"] = option(2, label="HO block length h", low=1, high=200, public=True,
                                          examples=(1, 2, 3, 4, 6, 8),
                                          help="HO block size h, or auto: the longest that fits in memory")
    rest: Rest = option("lr", label="rest of the chain", public=True,
                        help="the rest-of-chain term: lr (likelihood ratio), zo (zeroth order), none (biased)")
    tail: int | None = option(None, label="FO tail L", low=1,
                              help="FO tail L (default: from the sigma schedule, see --min-sigma-ratio)")
    # 0.3: on the built-in model at K = 10 (sigmas 0, 0.144, 0.243, 0.327, ...) this gives L = 3,
    # which cut the per-sample variance 4.1x below LR's (L = 1: 1.2x higher; L = 2: 2.2x lower;
    # bench.estimators, docs/benchmarks.md). The likelihood ratios at the smallest sigmas carry most of it.
    min_sigma_ratio: float = option(0.3, label="sigma ratio for L", low=0.0,
                                    help="sigma threshold for the default L")
    block_start: Literal["uniform", "grad-norm"] = option("uniform", label="block start",
                                                          help="how j is drawn")
    window: tuple[int, int] | None = option(None, label="block window", low=1,
                                            help="block starts j in [A, B] (a DCoT stage)")
    rest_steps: int | None = option(None, label="rest steps m", low=1,
                                    help="lr on m random steps of the rest, rescaled by |C|/m")
    zo_scale: float = option(1e-3, label="ZO scale s", low=0.0, help="std s of the zo term's perturbation")
    memory_budget_gb: float | None = option(None, label="memory budget (GB)", low=0.0,
                                            help="the memory block = auto may use (default: what is free)")
    temperature: float = 1.0  # grad-norm block start: p_j proportional to norm_j^(1/T)
    # (k, row) pairs per denoiser call in the "lr" term. None: the batch size, so the term holds
    # one sampling step's graph at a time, the memory the method doc's budget for h assumes;
    # larger chunks trade memory for fewer, bigger calls (faster on a GPU).
    chunk: int | None = None
    # Per-step gradient checkpointing in the FO tail and the HO block (as truncated BP has it).
    # block="auto" sizes h by the paper's accounting of kept graphs (use_checkpoint=False's
    # memory), so with checkpointing its h is conservative.
    use_checkpoint: bool = True
    # What R is compared with in the HO and "lr" terms (rlr_core/estimators/baselines.py); every
    # choice keeps G unbiased. "state" (the reward of the model's own x_0 prediction from the
    # noise-free next state) cut the variance 8x below "loo" on the built-in model at K = 10
    # (bench/results/estimators_baselines.json; docs/benchmarks.md). ZO always uses the leave-one-out mean.
    baseline: Baseline = option("state", label="baseline",
                                help="what R is compared with in likelihood-ratio terms (docs/method.md section 2)")
    # M >= 2 branches at the HO block: its last step's noise is drawn M - 1 more times from the same
    # mean and each continuation is run to x_0; the branches are each other's leave-one-out
    # baseline, so the HO advantage carries only the variance of the steps after the block (the
    # block's graph is shared; M - 1 extra forward rollouts). Unbiased: each branch is an
    # independent draw given x_j. The HO term then ignores ``baseline``.
    branches: int = option(1, label="branches M", low=1, help="M continuations of the HO block's last step")
    # "taylor": subtract from each HO and "lr" advantage the linearisation of the reward in that
    # step's noise around the noise-free next state, and add back its exact expectation (MuProp;
    # rlr_core/estimators/control_variate.py). One denoiser forward + backward per (k, row).
    control_variate: ControlVariate = option("none", label="control variate",
                                             help="the first-order (Taylor) control variate on likelihood-ratio terms")
    # G > 1: the batch is B/G prompts, each repeated G times from one shared x_K, with per-group
    # leave-one-out means (rlr_core/estimators/groups.py). Unbiased (see there).
    group_size: int = option(1, label="group size G", low=1,
                             help="G > 1: each batch is B/G prompts x G rows sharing the initial noise")
    kl_coef: float = kl_coef_option()  # beta of the exact KL to the round's parent (rlr_core/estimators/kl.py)
    kl_steps: int | None = KL_STEPS  # the KL's gradient at this many random steps (None: every step)
    name: ClassVar[str] = "rlr"
    _step_norms: torch.Tensor | None = field(default=None, repr=False)
    _auto_blocks: dict = field(default_factory=dict, repr=False)  # (K, L, batch) -> measured h

    # --- the plan: which step gets which term --------------------------------------------------

    def tail_length(self, chain: Chain) -> int:
        if self.tail is not None:
            return max(1, min(self.tail, chain.num_steps))
        L = fo_tail_length(chain.sigma, self.min_sigma_ratio)
        if self.window is not None:  # a DCoT window near the end: shorten the default tail so a block fits
            L = min(L, max(deterministic_tail(chain.sigma), self.window[1] - 1, 1))
        return L

    def block_size(self, chain: Chain, ctx: ChainContext, tail: int) -> int:
        room = chain.num_steps - tail
        if self.block == "auto":  # measured once per chain length and batch size
            key = (chain.num_steps, tail, ctx.batch)
            if key not in self._auto_blocks:
                b_h, b_z = measure_step_memory(chain, ctx, zo=self.rest == "zo")
                budget = int(self.memory_budget_gb * 2**30) if self.memory_budget_gb else default_budget()
                self._auto_blocks[key] = auto_block_size(budget, chain.num_steps, tail, b_h, b_z)
            return min(self._auto_blocks[key], room)
        return max(0, min(int(self.block), room))

    def start_range(self, chain: Chain, tail: int, h: int) -> tuple[int, int]:
        """Allowed block starts: L+1 .. K-h+1 (never touching the FO tail), cut to the window."""
        lo, hi = tail + 1, chain.num_steps - h + 1
        if self.window is not None:
            lo, hi = max(lo, self.window[0]), min(hi, self.window[1])
        if hi < lo:
            raise ValueError(f"no block start fits: K={chain.num_steps}, L={tail}, h={h}, window={self.window}")
        return lo, hi

    def draw_starts(self, chain: Chain, ctx: ChainContext, generator: torch.Generator,
                    lo: int, hi: int) -> torch.Tensor:
        """j per sample: uniform on [lo, hi], or proportional to calibrated per-step gradient norms."""
        if self.block_start == "uniform":
            return torch.randint(lo, hi + 1, (ctx.batch,), generator=generator)
        if self._step_norms is None:
            self.calibrate(chain, ctx, generator)
        w = self._step_norms[lo:hi + 1].clamp(min=1e-12) ** (1 / self.temperature)
        return lo + torch.multinomial(w / w.sum(), ctx.batch, replacement=True, generator=generator)

    @torch.no_grad()
    def _rest_plan(self, chain: Chain, tail: int, starts: torch.Tensor, h: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """C as a (K+1, B) mask, and per-row weights |C_b|/m when "lr" is subsampled to m steps."""
        K, B = chain.num_steps, len(starts)
        k = torch.arange(K + 1)[:, None]
        rest = (k > tail) & ~((k >= starts) & (k <= starts + h - 1))
        scale = torch.ones(B)
        if self.rest == "lr" and self.rest_steps is not None:
            m = self.rest_steps
            size = rest.sum(0)
            score = torch.rand((K + 1, B), generator=generator).masked_fill(~rest, -1.0)
            keep = torch.zeros_like(rest)
            keep.scatter_(0, score.topk(min(m, K + 1), dim=0).indices, True)
            rest = rest & keep
            scale = size / rest.sum(0).clamp(min=1)
        return rest, scale

    # --- the estimate -------------------------------------------------------------------------

    def plan(self, chain: Chain, ctx: ChainContext, generator: torch.Generator, tail: int,
             h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block starts j (B,), the rest-of-chain mask C (K+1, B) and its per-row rescaling."""
        if h > 0:
            lo, hi = self.start_range(chain, tail, h)
            starts = self.draw_starts(chain, ctx, generator, lo, hi)
        else:  # the FO tail covers the whole chain
            starts = torch.full((ctx.batch,), chain.num_steps + 1)
        rest, scale = self._rest_plan(chain, tail, starts, h, generator)
        return starts, rest, scale

    def accumulate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> Estimate:
        tail = self.tail_length(chain)
        h = self.block_size(chain, ctx, tail)
        x_K = peers = None
        if self.group_size > 1:  # B/G prompts x G rows sharing x_K (drawn first, from the generator)
            ctx, x_K, peers = group_batch(chain, ctx, generator, self.group_size)
        perturb = None
        if self.rest == "zo":  # C's perturbations shape the rollout, so the plan comes first
            starts, rest, scale = self.plan(chain, ctx, generator, tail, h)
            seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
            perturb = ZOPerturbation(chain, rest, self.zo_scale, seed)
            traj = chain.rollout(ctx, generator, perturb=perturb, x_K=x_K)
        else:  # rollout first: from one generator state, the same trajectory as every other
            # estimator draws (the estimator benchmark pairs estimates on common trajectories)
            traj = chain.rollout(ctx, generator, x_K=x_K)
            starts, rest, scale = self.plan(chain, ctx, generator, tail, h)
        R = fo_backward(chain, ctx, traj, tail, self.use_checkpoint)  # FO, steps L..1
        loss = -float(R.mean())
        chunk = self.chunk or ctx.batch
        rows = torch.arange(ctx.batch)
        if h > 0:
            if self.branches > 1:  # the branches are each other's baseline
                ends, A_ho = self.branch(chain, ctx, traj, R, starts, generator)
                taylor = self.control_variate != "none"
                slope_ho = self.weights(chain, ctx, traj, R, starts, chunk)[1] if taylor else None
            else:
                A_ho, slope_ho = self.weights(chain, ctx, traj, R, starts, chunk, peers=peers)
                ends, A_ho = traj.x[starts - 1, rows][None], A_ho[None]
            if slope_ho is not None:  # Taylor control variate, per branch end
                A_ho = taylor_advantages(A_ho, slope_ho, ends, traj, starts, rows)
            loss += self.ho_backward(chain, ctx, traj, starts, h, A_ho, ends, slope_ho)
        if self.rest == "lr":
            ks, rows_c = rest.nonzero(as_tuple=True)
            A, slope = self.weights(chain, ctx, traj, R, ks, chunk, rows_c, peers)
            if slope is not None:
                A = taylor_advantages(A, slope, traj.x[ks - 1, rows_c], traj, ks, rows_c)
                slope = slope * scale[rows_c].to(slope).reshape(-1, *[1] * (slope.ndim - 1))
            loss += lr_backward(chain, ctx, traj, ks, rows_c, A * scale[rows_c].to(A), chunk, slope)
        elif self.rest == "zo":
            zo_accumulate(chain, perturb, leave_one_out(R, peers))
        stats = {"tail": tail, "block": h, "block_start_mean": float(starts.float().mean())}
        loss += kl_term(chain, ctx, traj, self.kl_coef, self.kl_steps, stats, generator)
        return Estimate(R, loss, stats)

    def weights(self, chain: Chain, ctx: ChainContext, traj: Trajectory, R: torch.Tensor, ks: torch.Tensor,
                chunk: int, rows: torch.Tensor | None = None,
                peers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """R - beta for the likelihood-ratio pairs (ks[i], rows[i]), and the Taylor slopes a_k of
        the pairs when the control variate is on (else None); one pair per row when ``rows`` is
        None (the HO term, ks = the block starts j, grouped together for "state+loo")."""
        per_row = rows is None
        rows = torch.arange(ctx.batch) if per_row else rows
        return pair_advantages(chain, ctx, traj, R, ks, rows, self.baseline, self.control_variate, chunk,
                               groups=None if per_row else ks, peers=peers)

    @torch.no_grad()
    def branch(self, chain: Chain, ctx: ChainContext, traj: Trajectory, R: torch.Tensor, starts: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's end x_{j-1} and advantage for each of M branches: (M, B, *state), (M, B).

        Branch 0 is the recorded trajectory (reward R); branches 1..M-1 re-draw eps_j from the same
        mean mu(x_j, j) and finish the chain without a graph."""
        rows = torch.arange(ctx.batch)
        mean = traj.mean[starts, rows]
        sigma = chain.sigma[starts].to(mean).reshape(-1, *[1] * (mean.ndim - 1))
        ends, rewards = [traj.x[starts - 1, rows]], [R.detach()]
        for _ in range(self.branches - 1):
            x = mean + sigma * draw_noise(mean, generator)
            ends.append(x)
            rewards.append(finish_chain(chain, ctx, x, starts - 1, generator))
        Rm = torch.stack(rewards)
        A = Rm - (Rm.sum(0) - Rm) / (len(Rm) - 1)
        return torch.stack(ends), A

    def ho_backward(self, chain: Chain, ctx: ChainContext, traj: Trajectory, starts: torch.Tensor, h: int,
                    A: torch.Tensor, ends: torch.Tensor, slopes: torch.Tensor | None = None) -> float:
        """HO on block j+h-1..j, each row its own j (doc section 2, HO), as the surrogate
        -(1/B) sum_b (1/M) sum_m A_mb <m_theta, ((x^m_{j-1} - m_theta) / sigma_j^2).detach()>
        over the M block ends x^m_{j-1} (one, the recorded one, without branching); with the
        Taylor control variate, minus (1/B) sum_b <a_b, m_theta>, its added-back expectation."""
        rows = torch.arange(ctx.batch)
        top = starts + h - 1
        # Checkpointed like truncated BP's steps: the block then holds one step's graph at a time
        # (plus each step's input) instead of h graphs; the gradient is the same.
        # Inner steps top..j+1: graph kept, their noise held fixed.
        x = pathwise(chain, ctx, traj.x[top, rows].detach(), top, noise=traj.noise,
                     use_checkpoint=self.use_checkpoint, steps=h - 1)
        m = mean_with_graph(chain, x, starts, ctx, self.use_checkpoint)
        sigma2 = chain.sigma[starts].to(m).reshape(-1, *[1] * (m.ndim - 1)) ** 2
        shape = (len(A), ctx.batch, *[1] * (m.ndim - 1))
        score = ((A.to(m).reshape(shape) * (ends.to(m) - m)).mean(0) / sigma2).detach()
        loss = -(m * score).sum() / ctx.batch
        if slopes is not None:
            loss = loss - (m * slopes.to(m)).sum() / ctx.batch
        loss.backward()
        return float(loss.detach())

    def calibrate(self, chain: Chain, ctx: ChainContext, generator: torch.Generator) -> torch.Tensor:
        """Per-step gradient norms ||(1/B) sum_b (R_b - b_b) grad log p(x_{k-1}|x_k)|| from one batch,
        for the gradient-norm weighted block start. Does not touch ``.grad``."""
        params = chain.parameters()
        traj = chain.rollout(ctx, generator)
        with torch.no_grad():
            A = leave_one_out(chain.reward(traj.x0, ctx))
        norms = torch.zeros(chain.num_steps + 1)
        rows = torch.arange(ctx.batch)
        for k in range(1, chain.num_steps + 1):
            if float(chain.sigma[k]) <= 0:
                continue
            ks = torch.full((ctx.batch,), k)
            logp = log_prob_terms(chain, ctx, traj, ks, rows)
            grads = torch.autograd.grad((A.to(logp) * logp).mean(), params, allow_unused=True)
            norms[k] = torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
        self._step_norms = norms
        return norms


@torch.no_grad()
def finish_chain(chain: Chain, ctx: ChainContext, x: torch.Tensor, ks: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """R(x_0) after running each row b from state x[b] at step ks[b] down to x_0 (fresh noise)."""
    R: torch.Tensor | None = None
    for k in sorted(set(ks.tolist())):
        sel = (ks == k).nonzero().flatten()
        sub = ctx.take(sel)
        x0 = x[sel]
        if k > 0:
            def predict(s: torch.Tensor, kk: int, sub: ChainContext = sub) -> Prediction:
                return Prediction(chain.mean(s, kk, sub))
            x0 = rollout(predict, x0, chain.sigma, generator, start=k).x
        r = chain.reward(x0, sub).detach()
        R = torch.empty(len(x), dtype=r.dtype, device=r.device) if R is None else R
        R[sel.to(r.device)] = r
    return R


@torch.no_grad()
def zo_accumulate(chain: Chain, perturb: ZOPerturbation, A: torch.Tensor) -> None:
    """Add -(1/B) sum_b sum_{i in C_b} (R_b - b_b) delta_{b,i} / s^2 into .grad (doc section 2, ZO),
    replaying each delta from its seed."""
    B = len(A)
    coeff = -A / (perturb.scale**2 * B)
    params = chain.parameters()
    for k in range(1, chain.num_steps + 1):
        if not bool(perturb.active[k].any()):
            continue
        for p, d in zip(params, perturb.deltas(k)):
            g = torch.tensordot(coeff.to(d), d, dims=1)
            p.grad = g if p.grad is None else p.grad + g
