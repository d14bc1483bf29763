"""A latent diffusion backend: a Stable-Diffusion-like set of diffusers components.

The diffusion state is the VAE latent; ``decode`` (VAE decode, then [-1, 1] -> [0, 1]) sits
between x_0 and the reward and is differentiable, so every estimator runs unchanged.

    backend = DiffusersLatentBackend.from_pretrained("path/or/id", device="cuda")
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from rlr_core.backends.base import DiffusionBackend, PromptError


class DiffusersLatentBackend(DiffusionBackend):
    """A Stable Diffusion 1.x/2.x pipeline's UNet, VAE and text encoder (images)."""

    family = "stable-diffusion"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: torch.nn.Module,
                 tokenizer, scheduler, name: str = "latent-diffusion"):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # The sampler's step math is DDIM's; any diffusers scheduler config converts to it.
        self.scheduler = scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(
            scheduler.config)
        self.name = name
        for frozen in (vae, text_encoder):
            frozen.eval()
            frozen.requires_grad_(False)
        unet.eval()

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionPipeline, name: str | None = None) -> DiffusersLatentBackend:
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                   name or getattr(pipe, "name_or_path", None) or "latent-diffusion")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> DiffusersLatentBackend:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.to(device)
        return cls.from_pipeline(pipe, name=str(path))

    def __deepcopy__(self, memo: dict) -> DiffusersLatentBackend:
        # Versions and training copies differ only in the UNet: the frozen VAE and text encoder
        # (about 0.4 GB in fp16 for SD 1.5) are shared, not copied.
        out = copy.copy(self)
        out.unet = copy.deepcopy(self.unet, memo)
        out.scheduler = copy.deepcopy(self.scheduler, memo)
        return out

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    @property
    def image_size(self) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, h, w = self.state_shape
        return (h * factor, w * factor)

    @property
    def max_prompt_tokens(self) -> int:
        """Tokens a prompt may have: the tokenizer's limit less the start and end tokens."""
        return self.tokenizer.model_max_length - 2

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids) - 2

    def check_prompt(self, prompt: str) -> str:
        prompt = prompt.strip()
        if not prompt:
            raise PromptError("the prompt is empty")
        n, limit = self.prompt_tokens(prompt), self.max_prompt_tokens
        if n > limit:
            # Refused rather than cut: a silently truncated prompt rates and trains on words the
            # model never saw.
            raise PromptError(f"the prompt is {n} tokens long and this model reads at most {limit}: shorten it")
        return prompt

    def describe_prompt(self, prompt: str) -> str:
        if not prompt or not prompt.strip():
            return ""
        n, limit = self.prompt_tokens(prompt.strip()), self.max_prompt_tokens
        if n > limit:
            return f"⚠️ {n} / {limit} tokens: too long for this model's text encoder; shorten the prompt"
        return f"✓ {n} / {limit} tokens"

    def _autocast(self):
        """Mixed precision on CUDA for half-precision weights; plain fp32 elsewhere."""
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def model_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.unet(x, t, encoder_hidden_states=cond).sample
        return out.to(x.dtype)  # the chain's state stays fp32

    def prepare_for_training(self, gradient_checkpointing: bool | None = None) -> None:
        """Gradient checkpointing inside the UNet and the VAE decoder (default: on CUDA)."""
        if gradient_checkpointing is None:
            gradient_checkpointing = self.device.type == "cuda"
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    @property
    def state_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        with self._autocast():
            return self.text_encoder(ids)[0].float()

    def fidelity_judge(self, reward_encoder: str | None = None):
        """CLIP text-image similarity with the CLIP the reward proxy uses; None without one."""
        from rlr_core import fidelity

        source = fidelity.clip_source(reward_encoder)
        return fidelity.clip_similarity_judge(source, str(self.device)) if source else None

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            images = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)
