"""Measured per-step memory and the paper's closed-form block size (method doc section 3).

    h* = floor((B - B_z (K - L)) / (B_h - B_z))

B the memory budget, B_h the memory of one step whose graph is kept, B_z of one step that is only
recorded (a ZO or LR step). The paper's form has K - 1 for its single FO step; here the FO tail
covers L steps (computed, and freed, before the block).
"""

from __future__ import annotations

import os

import torch

from rlr_core.estimators.chain import Chain, ChainContext


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_step_memory(chain: Chain, ctx: ChainContext, zo: bool = False) -> tuple[int, int]:
    """(B_h, B_z) in bytes for one step of this chain at this batch size.

    On CUDA: peak allocator growth of one step with and without a graph. On CPU: the bytes the
    autograd graph saves for backward (parameters excluded), plus the step's record."""
    gen = torch.Generator("cpu").manual_seed(0)
    x = chain.initial(ctx, gen)
    k = chain.num_steps
    record = 3 * _bytes(x)  # x_{k-1}, eps_k, mu_k kept per step
    params = chain.parameters()
    delta = ctx.batch * sum(_bytes(p) for p in params) if zo else 0
    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            chain.mean(x, k, ctx)
        b_z = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        mu = chain.mean(x, k, ctx)
        b_h = torch.cuda.memory_allocated() - base
        del mu
        return b_h + record, b_z + record + delta
    param_ptrs = {p.data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chain.mean(x, k, ctx)
    return sum(seen.values()) + record, record + delta


def default_budget() -> int:
    """Free GPU memory (80%), or half the machine's RAM on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0] * 0.8)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def auto_block_size(budget: int, num_steps: int, tail: int, b_h: int, b_z: int) -> int:
    """h* = floor((B - B_z (K - L)) / (B_h - B_z)), clamped to [1, K - L]."""
    room = num_steps - tail
    if room < 1:
        return 1
    h = (budget - b_z * room) // max(b_h - b_z, 1)
    return int(min(max(h, 1), room))
