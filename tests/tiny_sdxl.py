"""A tiny random Stable-Diffusion-XL pipeline built from configs (no downloads), after diffusers'
own SDXL pipeline tests: a UNet with ``addition_embed_type="text_time"``, a CLIPTextModel and a
CLIPTextModelWithProjection (32-d each: 64-d tokens), 8x8 latents, 16x16 images, the tiny
hand-written tokenizer of :mod:`tests.tiny_sd` for both encoders (16 tokens at most)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.tiny_sd import tiny_tokenizer

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json
SDXL_BASE_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
TIME_EMBED_DIM = 8  # addition_time_embed_dim: 6 time ids x 8 + the 32-d pooled embedding = 80


def tiny_sdxl_pipeline(pooled_dim: int = 32) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=pooled_dim, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + pooled_dim, cross_attention_dim=64,
        norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    # SDXL base's own scheduler (Euler): the app samples with DDIM on its table (DDIMScheduler.from_config).
    scheduler = EulerDiscreteScheduler.from_config(SDXL_BASE_SCHEDULER)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


def save_tiny_sdxl(folder: Path) -> Path:
    tiny_sdxl_pipeline().save_pretrained(folder)
    return folder
