"""A diffusion backend with its sampler settings and a reward, seen as a :class:`Chain`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlr_core.backends.base import DiffusionBackend
from rlr_core.estimators.chain import Chain
from rlr_core.sampler import (
    Conditioning,
    SamplerSettings,
    StepIndex,
    prompt_conditioning,
    schedule_for,
    step_mean,
    step_x0,
)

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images in [0, 1], prompts -> (B,)


@dataclass
class PromptContext:
    """One batch: the prompts the reward judges, and the (possibly per-step) conditioning."""

    prompts: list[str]
    cond: Conditioning

    @property
    def batch(self) -> int:
        return len(self.prompts)

    def take(self, rows: torch.Tensor) -> PromptContext:
        return PromptContext([self.prompts[int(i)] for i in rows], self.cond.take(rows))


class BackendChain(Chain):
    def __init__(self, backend: DiffusionBackend, reward_fn: RewardFn, settings: SamplerSettings):
        self.backend = backend
        self.reward_fn = reward_fn
        self.settings = settings
        # the training sampler: for flow models the SDE even where generation uses the ODE (method doc section 10)
        self.schedule = schedule_for(backend, settings.steps, settings.eta, training=True)
        self.sigma = self.schedule.sigma
        self.reference: list[torch.Tensor] | None = None  # the KL's reference weights (None: the base)

    def set_reference(self) -> None:
        """Make the trainable weights as they are now (the round's parent) the KL's reference."""
        self.reference = [p.detach().clone() for p in self.parameters()]

    def context(self, prompts: list[str], stage_prompts: Sequence[list[str]] | None = None,
                stages: Sequence[int] | None = None) -> PromptContext:
        """Conditioning for ``prompts``; for DCoT, ``stage_prompts`` (coarse, mid, fine lists) and
        the stage of each sampling step. The reward always judges ``prompts``."""
        cond = prompt_conditioning(self.backend, prompts, self.settings.steps, stage_prompts,
                                   self.settings.guidance, stages)
        return PromptContext(list(prompts), cond)

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.backend.denoiser.named_parameters() if p.requires_grad]

    def initial(self, ctx: PromptContext, generator: torch.Generator) -> torch.Tensor:
        return self.backend.initial_noise(ctx.batch, generator)

    def mean(self, x: torch.Tensor, k: StepIndex, ctx: PromptContext) -> torch.Tensor:
        return step_mean(self.backend, self.schedule, x, k, ctx.cond, self.settings.guidance)

    def denoised(self, x: torch.Tensor, k: StepIndex, ctx: PromptContext) -> torch.Tensor:
        return step_x0(self.backend, self.schedule, x, k, ctx.cond, self.settings.guidance)

    @torch.no_grad()
    def reference_mean(self, x: torch.Tensor, k: StepIndex, ctx: PromptContext) -> torch.Tensor:
        """The reference model's mean. With :meth:`set_reference` called: the trainable weights
        swapped for the saved ones for one call (the round's parent). Otherwise the base model:
        the same denoiser with its LoRA adapter switched off (peft); a full fine-tune has no base
        left to switch to, so that needs an adapter."""
        if self.reference is not None:
            params = self.parameters()
            current = [p.detach().clone() for p in params]
            try:
                for p, ref in zip(params, self.reference):
                    p.copy_(ref)
                return self.mean(x, k, ctx)
            finally:
                for p, now in zip(params, current):
                    p.copy_(now)
        denoiser = self.backend.denoiser
        if not getattr(denoiser, "peft_config", None):
            raise ValueError("kl_coef > 0 needs a LoRA adapter (the base model is the adapter switched off)")
        denoiser.disable_adapters()
        try:
            return self.mean(x, k, ctx)
        finally:
            denoiser.enable_adapters()

    @torch.no_grad()
    def perturbed_mean(self, x: torch.Tensor, k: int, ctx: PromptContext,
                       deltas: list[torch.Tensor]) -> torch.Tensor:
        # One denoiser call per perturbed row (rows share the weights): add delta_b in place,
        # then restore the exact original values from a copy.
        params = self.parameters()
        saved = [p.detach().clone() for p in params]
        out = torch.empty_like(x)
        perturbed = torch.stack([torch.stack([d[b].abs().sum() for d in deltas]).sum() > 0
                                 for b in range(len(x))])
        plain = (~perturbed).nonzero().flatten()
        if len(plain):
            out[plain] = self.mean(x[plain], k, ctx.take(plain))
        try:
            for b in perturbed.nonzero().flatten().tolist():
                for p, d in zip(params, deltas):
                    p.add_(d[b])
                row = torch.tensor([b])
                out[row] = self.mean(x[row], k, ctx.take(row))
                for p, s in zip(params, saved):
                    p.copy_(s)
        finally:
            for p, s in zip(params, saved):
                p.copy_(s)
        return out

    def reward(self, x0: torch.Tensor, ctx: PromptContext) -> torch.Tensor:
        return self.reward_fn(self.backend.decode(x0), ctx.prompts)
