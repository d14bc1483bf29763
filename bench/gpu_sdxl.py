"""GPU check: the estimators on Stable Diffusion XL's real architecture (random weights, bf16, 1024x1024).

    python -m bench.gpu_sdxl [--json OUT.json] [--budget-s 450]   # OUT default: gpu_sdxl.json under bench/results/
    python -m bench.gpu_sdxl --tiny --json OUT.json       # a tiny SDXL on the CPU, same code (the test)

For a GPU machine without hub access. Builds SDXL base 1.0's UNet (2.6 B parameters, 128x128
latents), VAE and both text encoders (CLIP ViT-L/14's and OpenCLIP bigG's text towers) from their
configurations, wraps them in the app's backend (``rlr_core.backends.sdxl.SDXLBackend``: pooled
embedding and time ids included), puts a rank-4 LoRA on the UNet, and with a simple differentiable
reward on the decoded 1024x1024 pixels measures, per gradient estimate (eta 1, CFG):

    time_s     wall time of one estimate (after one untimed warm-up estimate)
    peak_gb    the CUDA allocator's peak during it, weights included (None on a CPU);
               peak_above_gb: above what was allocated before

for full BP (per-step checkpointing), truncated BP K'=1, DDPO (one update), RLR h = 2 and 4; then
B_h and B_z (one kept step, one forward-only step) with the h ``block="auto"`` picks for 24, 40
and 80 GB, and a 5-step training round of the app's round code (default RLR). The measuring code
is bench/gpu_sd15.py's; only the model differs. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench import gpu_sd15
from bench.sd_models import TINY_VAE, count_params, offline_tokenizer
from rlr_core.backends.sdxl import SDXLBackend
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.estimators.memory import measure_step_memory
from rlr_core.estimators.rlr import RLR
from rlr_core.sampler import SamplerSettings

GB = 2**30
BUDGETS_GB = (24, 40, 80)
ROWS: list[tuple[str, str, dict]] = [
    ("full-bp (ckpt)", "full-bp", {}),
    ("truncated-bp K'=1", "truncated-bp", {"steps": 1}),
    ("ddpo (one update)", "ddpo", {}),
    ("rlr h=2", "rlr", {"block": 2}),
    ("rlr h=4", "rlr", {"block": 4}),
]

# stabilityai/stable-diffusion-xl-base-1.0's configurations (unet/, vae/, text_encoder*/ config.json).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32)  # 2816 = 6 time ids x 256 + 1280 pooled
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=48, projection_dim=32)  # the prompts spelled letter by letter fit


def build_backend(tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[SDXLBackend, dict]:
    """The random-weight SDXL (or tiny) backend on ``device`` in ``dtype``, and a description."""
    torch.manual_seed(seed)
    tok = offline_tokenizer(TINY_TEXT["max_position_embeddings"] if tiny else 77)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg_1, cfg_2 = (dict(TINY_TEXT, vocab_size=len(tok), **ids),) * 2 if tiny else (
        dict(SDXL_TEXT, **ids), dict(SDXL_TEXT_2, **ids))
    with torch.device(device):  # random init straight on the device
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SDXL_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE))
        text = CLIPTextModel(CLIPTextConfig(**cfg_1))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg_2))
    unet, vae, text, text_2 = (m.to(dtype) for m in (unet, vae, text, text_2))
    name = "sdxl-tiny-random" if tiny else "sdxl-random"
    backend = SDXLBackend(unet, vae, text, text_2, tok, tok, DDIMScheduler(**SDXL_SCHEDULER), name=name)
    info = {"name": name, "dtype": str(dtype).removeprefix("torch."), "device": device,
            "params": {"unet": count_params(unet), "vae": count_params(vae), "text_encoder": count_params(text),
                       "text_encoder_2": count_params(text_2)},
            "latent_shape": list(backend.state_shape), "image_size": list(backend.image_size),
            "text_encoders": ("tiny CLIP text encoders" if tiny else
                              "CLIP ViT-L/14 and OpenCLIP bigG text towers, SDXL base's configurations "
                              "(hand-written tokenizer)")}
    return backend, info


class Report(gpu_sd15.Report):
    """gpu_sd15's report with SDXL's own checks (there is no paper figure for SDXL to compare with)."""

    def judge(self, data: dict) -> list[dict]:
        return targets(data)


def targets(data: dict) -> list[dict]:
    out = []
    rows = data["rows"]
    done = [r for r in rows if "time_s" in r]
    if rows:
        out.append({"check": "every row ran without error", "value": f"{len(done)}/{len(rows)}",
                    "met": len(done) == len(rows)})
    for r in done:
        if r.get("peak_gb") is not None and r["estimator"] == "rlr":
            out.append({"check": f"{r['row']} peak memory <= 80 GB at batch {r['batch']}",
                        "value": f"{r['peak_gb']:.2f} GB", "met": r["peak_gb"] <= 80})
    rnd = data["round"]
    if rnd and "steps_done" in rnd:
        out.append({"check": "training round finished, finite rewards, version written",
                    "value": f"{rnd['steps_done']} steps, {rnd['elapsed_s']:.1f} s",
                    "met": rnd["steps_done"] == data["round_steps"] and rnd["finite"] and rnd["wrote_version"]})
    return out


def step_memory(chain: BackendChain, batch: int) -> dict:
    ctx = chain.context([gpu_sd15.PROMPTS[i % len(gpu_sd15.PROMPTS)] for i in range(batch)])
    b_h, b_z = measure_step_memory(chain, ctx)
    tail = RLR().tail_length(chain)
    auto = {f"{b}GB": RLR(block="auto", memory_budget_gb=b).block_size(chain, ctx, tail) for b in BUDGETS_GB}
    return {"B_h_gb": b_h / GB, "B_z_gb": b_z / GB, "tail_L": tail, "auto_h": auto}


def run(args: argparse.Namespace) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    backend, info = build_backend(args.tiny, args.device, dtype)
    if args.vae_checkpoint:
        backend.vae.enable_gradient_checkpointing()  # the reward's backward through the 1024x1024 decoder
    sampler = SamplerSettings(steps=args.steps, eta=1.0, guidance=args.guidance)
    header = {"model": {**info, "build_s": time.perf_counter() - t0, "vae_checkpointing": args.vae_checkpoint},
              "sampler": vars(sampler) | {"lora_rank": 4, "reward": "redness of the decoded pixels"},
              "budget_s": args.budget_s, "round_steps": args.round_steps}
    report = Report(args.json, header)
    report.write()
    print(f"{info['name']}: {info['params']} parameters, {info['dtype']} on {args.device}; "
          f"built in {header['model']['build_s']:.1f} s", flush=True)
    return gpu_sd15.measure(backend, sampler, report, args, ROWS, step_memory)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny SDXL with the same structure, on the CPU, 6 steps")
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/gpu_sdxl.json (none with --tiny)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (default 30; 6 with --tiny)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (1 switches it off)")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--round-steps", type=int, default=5)
    p.add_argument("--round-batch", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds")
    p.add_argument("--no-vae-checkpoint", dest="vae_checkpoint", action="store_false")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.steps = args.steps or (6 if args.tiny else 30)
    if args.json is None and not args.tiny:
        args.json = Path("bench/results/gpu_sdxl.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args)
    gpu_sd15.print_summary(data, f"{data['model']['name']} ({data['model']['dtype']}), K={args.steps}, "
                           f"CFG {args.guidance}", args.json,
                           ["B_h_gb", "B_z_gb", "tail_L"])


if __name__ == "__main__":
    main()
