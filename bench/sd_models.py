"""Stable Diffusion 1.5's architecture with random weights, built offline (no hub), as a backend.

The configurations are SD 1.5's own (UNet: 320/640/1280/1280 blocks, 2 layers per block, 8 head
dims, cross-attention 768, 64x64 latents; VAE: 128/256/512/512, scaling 0.18215; text encoder:
CLIP ViT-L/14's text tower, 12 layers, width 768, 77 tokens). The tokenizer is a small hand-written
byte-pair vocabulary (the real one is a 49408-entry download); the text encoder keeps the real
49408-row embedding, so its size and cost are the real ones. ``tiny=True`` gives a CPU-sized
model with the same structure (the tests' pipeline).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlr_core.backends.latent import DiffusersLatentBackend

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False)

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=16)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=48)  # the prompts spelled letter by letter fit

PROMPTS = ["a photo of a red sports car", "a watercolor painting of a cat", "an astronaut riding a horse",
           "a bowl of fruit on a wooden table"]


def offline_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIP byte-pair tokenizer from a hand-written vocabulary: letters, word-final letters and
    a few merges (enough to give distinct ids per word; no download)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "re", "red</w>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[("r", "e"), ("re", "d</w>")],
                         model_max_length=max_length)


class CastingLatentBackend(DiffusersLatentBackend):
    """Runs a low-precision UNet and VAE on float32 states: casts their inputs to the weights'
    dtype and their outputs back (the sampler's step math and log-densities stay in float32).
    Used only when the plain backend cannot run these weights itself (see :func:`build_backend`)."""

    def model_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.to(x.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        return ((images + 1) / 2).clamp(0, 1)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_backend(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[DiffusersLatentBackend, dict]:
    """The random-weight SD 1.5 (or tiny) backend on ``device`` in ``dtype``, and a description."""
    torch.manual_seed(seed)
    max_len = TINY_TEXT["max_position_embeddings"] if tiny else 77
    tok = offline_tokenizer(max_len)
    text_cfg = dict(TINY_TEXT if tiny else SD15_TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    if tiny:
        text_cfg["vocab_size"] = len(tok)
    with torch.device(device):  # random init straight on the device: seconds instead of a minute
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    unet, vae, text = (m.to(dtype) for m in (unet, vae, text))
    parts = dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=DDIMScheduler(**SD15_SCHEDULER),
                 name="sd15-tiny-random" if tiny else "sd15-random")
    backend = DiffusersLatentBackend(**parts)
    dtype_handling = "backend"
    if not _runs(backend):
        backend = CastingLatentBackend(**parts)
        dtype_handling = "bench cast (the plain backend could not run these weights)"
    info = {"name": parts["name"], "dtype": str(dtype).removeprefix("torch."), "device": device,
            "dtype_handling": dtype_handling,
            "params": {"unet": count_params(unet), "vae": count_params(vae), "text_encoder": count_params(text)},
            "latent_shape": list(backend.state_shape),
            "text_encoder": ("tiny CLIP text encoder" if tiny else
                             "CLIP ViT-L/14 text tower, SD 1.5's real configuration (hand-written tokenizer)")}
    return backend, info


@torch.no_grad()
def _runs(backend: DiffusersLatentBackend) -> bool:
    """Can the backend run a float32 state through its denoiser and VAE as it is?"""
    x = torch.zeros(1, *backend.state_shape, device=backend.device)
    try:
        cond = backend.encode_prompts([""])
        backend.model_output(x, torch.tensor([1], device=backend.device), cond)
        backend.decode(x)
    except (RuntimeError, TypeError):  # e.g. "Input type (float) and bias type (BFloat16) should be the same"
        return False
    return True


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A simple differentiable reward on decoded pixels: red minus the other channels."""
    images = images.float()
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean(dim=(1, 2))
