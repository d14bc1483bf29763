"""A latent diffusion backend: a Stable-Diffusion-like set of diffusers components.

The diffusion state is the VAE latent; ``decode`` (VAE decode, then [-1, 1] -> [0, 1]) sits
between x_0 and the reward and is differentiable, so every estimator runs unchanged.

    backend = DiffusersLatentBackend.from_pretrained("path/or/id", device="cuda")
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from rlr_core.backends.base import DiffusionBackend


class DiffusersLatentBackend(DiffusionBackend):
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

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    @property
    def state_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)
