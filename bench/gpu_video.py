"""GPU check, video: the estimators on AnimateDiff (SD 1.5 + a motion adapter, random weights).

    python -m bench.gpu_video [--json OUT.json]          # 16 frames, 512x512, 25 steps, bf16
    python -m bench.gpu_video --tiny --json OUT.json     # a tiny model on the CPU (the test)

The video UNet is ``UNetMotionModel.from_unet2d(SD 1.5's UNet, MotionAdapter())`` (the adapter's
default configuration is AnimateDiff v1.5's: motion modules on 320/640/1280/1280 blocks, 8 heads,
32 positions); the state is the latent clip (4, F, 64, 64) and the reward the mean redness of
the F decoded frames. Rows at batch 1: truncated BP K'=1, DDPO (sampling and one inner epoch,
one clip per denoiser call) and RLR h = 1, 2, each timed once after a warm-up, with the allocator's peak.
At batch 1 the likelihood-ratio terms have no baseline (their gradient is 0); their cost is real.

The backend is the app's (``rlr_core.backends.animatediff.AnimateDiffBackend``: bf16 under
autocast on CUDA), prepared as a training round prepares it (gradient checkpointing in the motion
UNet and the VAE, the decode in checkpointed chunks of frames); ``--no-prepare`` gives the first
H200 run's setup (VAE checkpointing only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNetMotionModel

from bench.common import print_table
from bench.gpu_sd15 import Report, _fmt_row, measure_row
from bench.sd_models import CastingLatentBackend, _runs, build_backend, redness
from rlr_core.backends.animatediff import DECODE_CHUNK, AnimateDiffBackend
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.sampler import SamplerSettings
from rlr_core.training import lora

TINY_ADAPTER = dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                    motion_norm_num_groups=8, motion_max_seq_length=8)
ROWS: list[tuple[str, str, dict]] = [
    ("truncated-bp K'=1", "truncated-bp", {"steps": 1}),
    # one inner epoch (DDPO's default 4 repeat it on the same samples: about 4x this row's gradient work)
    ("ddpo (1 inner epoch)", "ddpo", {"chunk": 1, "inner_epochs": 1}),
    ("rlr h=1", "rlr", {"block": 1}),
    ("rlr h=2", "rlr", {"block": 2}),
]


class CastingAnimateDiffBackend(AnimateDiffBackend, CastingLatentBackend):
    """The app's backend with the bench's casts, for weights it cannot run as they are (bf16 on a
    CPU: autocast is CUDA-only there); AnimateDiffBackend's calls reach CastingLatentBackend's."""


def video_redness(clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean redness over the frames of each clip (B, F, 3, H, W) -> (B,)."""
    b, f = clips.shape[:2]
    return redness(clips.flatten(0, 1), list(prompts) * f).reshape(b, f).mean(1)


def build_video_backend(tiny: bool, device: str, dtype: torch.dtype, frames: int) -> tuple[AnimateDiffBackend, dict]:
    """The app's AnimateDiff backend (rlr_core.backends.animatediff) on SD 1.5 + a default
    MotionAdapter with random weights (tiny: the tests' sizes)."""
    image, info = build_backend(tiny, device, dtype)
    with torch.device(device):
        adapter = MotionAdapter(**(TINY_ADAPTER if tiny else {}))
        unet = UNetMotionModel.from_unet2d(image.unet, adapter).to(dtype)
    del adapter
    parts = dict(unet=unet, vae=image.vae, text_encoder=image.text_encoder, tokenizer=image.tokenizer,
                 scheduler=image.scheduler, name=info["name"] + "-animatediff", num_frames=frames)
    backend: AnimateDiffBackend = AnimateDiffBackend(**parts)
    handling = "backend (rlr_core.backends.animatediff)"
    if not _runs(backend):
        backend = CastingAnimateDiffBackend(**parts)
        handling = "bench cast (CastingAnimateDiffBackend: the plain backend could not run these weights)"
    info = {**info, "name": backend.name, "frames": frames, "latent_shape": list(backend.state_shape),
            "params": {**info["params"], "unet": sum(p.numel() for p in unet.parameters())},
            "dtype_handling": handling}
    return backend, info


def run(args: argparse.Namespace) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    backend, info = build_video_backend(args.tiny, args.device, dtype, args.frames)
    if args.prepare:
        backend.prepare_for_training(True)  # what a training round does (rlr_core.training.round)
    else:
        backend.vae.enable_gradient_checkpointing()  # the first H200 run's setup
    sampler = SamplerSettings(steps=args.steps, eta=1.0, guidance=args.guidance)
    report = Report(args.json, {"model": {**info, "build_s": time.perf_counter() - t0},
                                "sampler": vars(sampler) | {"lora_rank": 4, "reward": "mean redness of the frames"},
                                "training_setup": ("prepare_for_training: checkpointing in the motion UNet and "
                                                   "the VAE, decode in checkpointed chunks of "
                                                   f"{DECODE_CHUNK} frames" if args.prepare else
                                                   "VAE gradient checkpointing only"),
                                "budget_s": args.budget_s})
    params = lora.add_lora(backend, rank=4, seed=0)
    report.data["model"]["lora"] = {"rank": 4, "params": sum(p.numel() for p in params)}
    chain = BackendChain(backend, video_redness, sampler)
    print(f"{info['name']}: {info['params']} parameters, {info['frames']} frames, latents {info['latent_shape']}",
          flush=True)
    warm = time.perf_counter()
    measure_row(chain, "warm-up", "truncated-bp", {"steps": 1}, args.batch, seed=1)
    report.data["warmup_s"] = time.perf_counter() - warm
    for label, name, settings in ROWS:
        if report.elapsed() > args.budget_s:
            row = {"row": label, "estimator": name, "batch": args.batch, "skipped": "time budget"}
        else:
            try:
                row = measure_row(chain, label, name, settings, args.batch, seed=100)
            except torch.cuda.OutOfMemoryError as err:
                row = {"row": label, "estimator": name, "batch": args.batch,
                       "error": f"out of memory: {str(err)[:200]}"}
            if backend.device.type == "cuda":
                torch.cuda.empty_cache()
        report.data["rows"].append(row)
        report.write()
        print(_fmt_row(row), flush=True)
    report.data["complete"] = True
    report.write()
    return report.data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny UNet and adapter on the CPU, 4 frames, 4 steps")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--frames", type=int, default=None, help="default 16 (4 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 25 (4 with --tiny)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=240, help="start no row after this many seconds")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-prepare", dest="prepare", action="store_false",
                   help="VAE checkpointing only (the first H200 run), not the backend's prepare_for_training")
    args, _ = p.parse_known_args(argv)  # tolerates gpu_sd15's extra arguments (scripts/gpu_check.sh)
    args.device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.frames = args.frames or (4 if args.tiny else 16)
    args.steps = args.steps or (4 if args.tiny else 25)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args)
    done = [r for r in data["rows"] if "time_s" in r]
    print_table(done, ["row", "batch", "time_s", "peak_gb", "peak_above_gb", "block_used", "tail_L", "grad_norm"],
                title=f"{data['model']['name']}, {args.frames} frames, K={args.steps}, CFG {args.guidance}")
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
