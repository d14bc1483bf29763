"""A tiny random AnimateDiff pipeline built from configs (no downloads): the tiny Stable Diffusion
of :mod:`tests.tiny_sd` (8x8 latents, 16x16 frames, 16-token prompts) plus a tiny diffusers
``MotionAdapter`` (one temporal layer per block, 8 positions), as ``AnimateDiffPipeline`` joins them."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

from tests.tiny_sd import tiny_pipeline

# The UNet's blocks (16, 32) and norm groups (8); at most 8 frames.
TINY_ADAPTER = dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                    motion_norm_num_groups=8, motion_max_seq_length=8)


def tiny_animatediff_pipeline(seed: int = 0) -> AnimateDiffPipeline:
    sd = tiny_pipeline()
    torch.manual_seed(seed)
    adapter = MotionAdapter(**TINY_ADAPTER)
    return AnimateDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                               motion_adapter=adapter, scheduler=sd.scheduler, feature_extractor=None,
                               image_encoder=None)


def save_tiny_animatediff(folder: Path) -> Path:
    tiny_animatediff_pipeline().save_pretrained(folder)
    return folder
