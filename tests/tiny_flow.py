"""A tiny random Stable-Diffusion-3 pipeline built from configs (no downloads): 8x8 latents with
16 channels, 16x16 images, two tiny CLIPs with projection and a tiny T5 with a hand-written
tokenizer. Save it and load it back (:func:`save_tiny_sd3`) so the tokenizers are the ones a
plain pipeline reads from the folder.

And a tiny FLUX.1 (:func:`tiny_flux_pipeline`): 8x8 latents with 4 channels packed into 16 tokens
of 16 values, 16x16 images (the VAE's sample_size), one double- and one single-stream block, a
tiny CLIP (pooled) and the tiny T5; ``guidance_embeds`` True is FLUX.1-dev, False FLUX.1-schnell;
the scheduler is FLUX.1's (dynamic shifting)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tests.tiny_sd import tiny_tokenizer


def tiny_t5_tokenizer() -> T5TokenizerFast:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def _clip(tok, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()
    clip_l, clip_g = _clip(tok, 0), _clip(tok, 1)
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=8)
    torch.manual_seed(4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.0609,
                        scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                                    tokenizer=tok, text_encoder_2=clip_g, tokenizer_2=tok, text_encoder_3=t5,
                                    tokenizer_3=t5tok)


def save_tiny_sd3(folder: Path) -> Path:
    tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def load_tiny_sd3(folder: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)


def tiny_flux_pipeline(guidance_embeds: bool = True) -> FluxPipeline:
    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    torch.manual_seed(2)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5tok), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 pad_token_id=0, eos_token_id=1))
    torch.manual_seed(3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    torch.manual_seed(4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.1159,
                        scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    # FLUX.1-dev's scheduler config (use_dynamic_shifting: the shift mu from the image's token count)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5tok, transformer=transformer)


def save_tiny_flux(folder: Path, guidance_embeds: bool = True) -> Path:
    tiny_flux_pipeline(guidance_embeds).save_pretrained(folder)
    return folder


def load_tiny_flux(folder: Path) -> FluxPipeline:
    return FluxPipeline.from_pretrained(str(folder), local_files_only=True)
