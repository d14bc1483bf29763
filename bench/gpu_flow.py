"""GPU check: the estimators on the flow-matching models' real architectures (random weights, bf16, 1024x1024).

    python -m bench.gpu_flow --model sd35m [--json OUT.json] [--budget-s 450]   # SD3.5-Medium
    python -m bench.gpu_flow --model flux-dev [--json OUT.json]                 # FLUX.1-dev
    python -m bench.gpu_flow --model flux-dev --tiny --json OUT.json            # tiny, on the CPU (the test)

For a GPU machine without hub access (results by default in bench/results/, as gpu_flow_MODEL.json). Builds the
model's transformer, VAE and text encoders from the configurations written out below, wraps them
in the app's own backend (``rlr_core.backends.flow_models``: SD3Backend / FluxBackend, the same
pipeline objects the app loads, text encoders included), puts a rank-4 LoRA on the transformer's
attention projections, switches on what a training copy gets in the app (``prepare_for_training``:
gradient checkpointing inside the transformer and the VAE on CUDA) and, with a simple
differentiable reward on the decoded 1024x1024 pixels, measures per gradient estimate on the
training chain (Flow-GRPO's reverse SDE, eta 1):

    time_s     wall time of one estimate (after one untimed warm-up estimate)
    peak_gb    the CUDA allocator's peak during it, weights included (None on a CPU);
               peak_above_gb: above what was allocated before

for full BP (per-step checkpointing), truncated BP K'=1, DDPO (one update), RLR h = 2 and 4; then
B_h and B_z (one kept step, one forward-only step) with the h ``block="auto"`` picks for 24, 40
and 80 GB, and a 5-step training round of the app's round code (default RLR). The sampling steps
and guidance are the family's round defaults (rlr_core/training/defaults.py: SD3 10 steps with
CFG 4.5, FLUX 6 steps with embedded guidance 3.5). The measuring code is bench/gpu_sd15.py's
(through bench/gpu_sdxl.py's report); only the model differs. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import time
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

from bench import gpu_sd15, gpu_sdxl
from bench.sd_models import count_params, offline_tokenizer
from rlr_core.backends.flow_models import FluxBackend, SD3Backend
from rlr_core.sampler import SamplerSettings
from rlr_core.training.defaults import FAMILY_DEFAULTS

MODELS = ("sd35m", "flux-dev")
ROWS = gpu_sdxl.ROWS
BUDGETS_GB = gpu_sdxl.BUDGETS_GB

# stabilityai/stable-diffusion-3.5-medium's transformer/config.json: 24 MMDiT-X layers of 24 heads x 64
# (width 1536), dual attention (a second, image-only attention) in layers 0-12, RMS QK-norm, 2x2
# patches of 128x128x16 latents, position embeddings up to 384 patches a side. 2.24 B parameters and
# a 0.23 B-entry position-embedding buffer (2.47 B stored: the published "2.5 B").
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# black-forest-labs/FLUX.1-dev's transformer/config.json (FluxTransformer2DModel's defaults but the
# guidance embedding): 19 double- and 38 single-stream blocks of 24 heads x 128 (width 3072), 64
# input channels (16-channel latents in 2x2 patches), rotary axes 16/56/56. 11.9 B parameters.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Both VAEs (vae/config.json): SDXL's 128/256/512/512 autoencoder with 16 latent channels, no quant convs.
FLOW_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False)
VAE_FACTORS = {"sd35m": dict(scaling_factor=1.5305, shift_factor=0.0609),
               "flux-dev": dict(scaling_factor=0.3611, shift_factor=0.1159)}
# The text encoders: CLIP ViT-L/14's text tower (both models), OpenCLIP bigG's (SD3), T5 v1.1 XXL's encoder.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1)
# The schedulers (scheduler/scheduler_config.json): SD3 a fixed shift 3, FLUX the resolution-dependent one.
SCHEDULERS = {"sd35m": dict(num_train_timesteps=1000, shift=3.0),
              "flux-dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                               max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)}

# CPU-sized models with the same structure (tests/tiny_flow.py's): 8x8 latents, 16x16 images.
TINY_TRANSFORMER = {
    "sd35m": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                  pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"),
    "flux-dev": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                     axes_dims_rope=(2, 2, 4)),
}
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=16, use_quant_conv=False, use_post_quant_conv=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=48, projection_dim=32)  # the prompts spelled letter by letter fit
TINY_T5 = dict(vocab_size=64, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1)


def offline_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer from a hand-written unigram vocabulary (letters; no download). The encoder
    keeps the real 32128-row embedding, so its size and cost are the real ones."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


@contextlib.contextmanager
def building(device: str, dtype: torch.dtype):
    """Random init straight on the device and in the dtype (FLUX's 12 B fp32 weights would need 48 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_backend(model: str, tiny: bool, device: str, dtype: torch.dtype,
                  seed: int = 0) -> tuple[SD3Backend, dict]:
    """The random-weight SD3.5-Medium or FLUX.1-dev (or tiny) backend on ``device`` in ``dtype``, and a description."""
    if model not in MODELS:
        raise ValueError(f"--model {model}: choose {', '.join(MODELS)}")
    torch.manual_seed(seed)
    flux = model == "flux-dev"
    tok, t5tok = offline_tokenizer(TINY_CLIP["max_position_embeddings"] if tiny else 77), offline_t5_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clip_l, clip_g = (dict(TINY_CLIP, vocab_size=len(tok), **ids),) * 2 if tiny else (
        dict(CLIP_L, **ids), dict(CLIP_G, **ids))
    vae_cfg = dict(TINY_VAE if tiny else FLOW_VAE, **VAE_FACTORS[model])
    with building(device, dtype):
        transformer_cls = FluxTransformer2DModel if flux else SD3Transformer2DModel
        transformer = transformer_cls(**(TINY_TRANSFORMER[model] if tiny else
                                         (FLUX_DEV_TRANSFORMER if flux else SD35M_TRANSFORMER)))
        vae = AutoencoderKL(**vae_cfg)
        t5 = T5EncoderModel(T5Config(**(TINY_T5 if tiny else T5_XXL)))
        text = (CLIPTextModel if flux else CLIPTextModelWithProjection)(CLIPTextConfig(**clip_l))
        text_2 = None if flux else CLIPTextModelWithProjection(CLIPTextConfig(**clip_g))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[model])
    name = f"{model}-{'tiny-' if tiny else ''}random"
    if flux:
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=t5,
                            tokenizer_2=t5tok, transformer=transformer)
        backend = FluxBackend.from_pipeline(pipe, name=name)
        encoders = {"text_encoder": text, "text_encoder_2": t5}
    else:
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text,
                                        tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok, text_encoder_3=t5,
                                        tokenizer_3=t5tok)
        backend = SD3Backend.from_pipeline(pipe, name=name)
        encoders = {"text_encoder": text, "text_encoder_2": text_2, "text_encoder_3": t5}
    info = {"name": name, "family": backend.family, "dtype": str(dtype).removeprefix("torch."), "device": device,
            "params": {"transformer": count_params(transformer), "vae": count_params(vae),
                       **{k: count_params(m) for k, m in encoders.items()}},
            "latent_shape": list(backend.state_shape), "image_size": list(backend.image_size),
            "noise_level": backend.noise_level, "guidance": "embedded" if backend.guidance_in_model else "CFG",
            "text_encoders": ("tiny CLIP and T5" if tiny else
                              "CLIP ViT-L/14" + ("" if flux else ", OpenCLIP bigG") + " text towers and T5 v1.1 XXL's "
                              "encoder, the model's configurations (hand-written tokenizers)")}
    return backend, info


def run(args: argparse.Namespace) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    backend, info = build_backend(args.model, args.tiny, args.device, dtype)
    if args.grad_checkpoint:
        backend.prepare_for_training(gradient_checkpointing=True)  # what the app's training copy gets on CUDA
    sampler = SamplerSettings(steps=args.steps, eta=1.0, guidance=args.guidance)
    header = {"model": {**info, "build_s": time.perf_counter() - t0, "gradient_checkpointing": args.grad_checkpoint},
              "sampler": vars(sampler) | {"lora_rank": 4, "reward": "redness of the decoded pixels"},
              "budget_s": args.budget_s, "round_steps": args.round_steps}
    report = gpu_sdxl.Report(args.json, header)
    report.write()
    print(f"{info['name']}: {info['params']} parameters, {info['dtype']} on {args.device}; "
          f"built in {header['model']['build_s']:.1f} s", flush=True)
    return gpu_sd15.measure(backend, sampler, report, args, ROWS, gpu_sdxl.step_memory)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="sd35m")
    p.add_argument("--tiny", action="store_true", help="a tiny model with the same structure, on the CPU")
    p.add_argument("--json", type=Path, default=None,
                   help="default: bench/results/gpu_flow_<model>.json (none with --tiny)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default: the family's round default)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance (default: the family's round default; CFG for SD3, embedded for FLUX)")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--round-steps", type=int, default=5)
    p.add_argument("--round-batch", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds")
    p.add_argument("--no-grad-checkpoint", dest="grad_checkpoint", action="store_false",
                   help="no gradient checkpointing inside the transformer and the VAE (default: on, except --tiny)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    family = FAMILY_DEFAULTS["flux" if args.model == "flux-dev" else "stable-diffusion-3"]
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.steps = args.steps or family["sampling_steps"]
    args.guidance = family["guidance"] if args.guidance is None else args.guidance
    if args.tiny and "--no-grad-checkpoint" not in (argv or []):
        args.grad_checkpoint = False
    if args.json is None and not args.tiny:
        args.json = Path(f"bench/results/gpu_flow_{args.model}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args)
    gpu_sd15.print_summary(data, f"{data['model']['name']} ({data['model']['dtype']}), K={args.steps}, "
                           f"guidance {args.guidance}", args.json,
                           ["B_h_gb", "B_z_gb", "tail_L"])


if __name__ == "__main__":
    main()
