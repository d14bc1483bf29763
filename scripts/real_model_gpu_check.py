"""The app's diffusers path on a GPU, at Stable Diffusion 1.5's real size (random weights: no hub).

    python scripts/real_model_gpu_check.py --out bench/results/real_model_gpu.json

1. builds a pipeline with SD 1.5's configuration (UNet 320/640/1280/1280, CLIP-L-sized text
   encoder, SD VAE; random weights), saves it, and loads it the way ``python app.py --model`` does
   (``load_backend``, dtype auto);
2. times generation at 512x512, 50 steps, guidance 7.5 (batch 1 and 4) with the app's sampler;
3. runs one training step per estimator through ``rlr_core.training.run_round`` (RLR with block
   "auto", DDPO, truncated BP K'=1, full BP) on a training copy, 50 sampling steps, batch 2, with
   gradient checkpointing and autocast, recording time and peak memory;
4. writes a version with a non-zero LoRA, loads it into a plain fp32 ``StableDiffusionPipeline``
   with ``load_lora_weights`` and compares its images with the app's fp32 version for one seed.

``--small`` runs the same on a tiny model (on a CPU: checks the script, not the numbers).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from rlr_core.backends.loading import load_backend  # noqa: E402
from rlr_core.sampler import SamplerSettings, generate  # noqa: E402
from rlr_core.training import EstimatorConfig, TrainConfig, lora, run_round  # noqa: E402

PROMPT = "a red cat"


def tokenizer(max_length: int) -> CLIPTokenizer:
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "re", "red</w>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[("r", "e"), ("re", "d</w>")],
                         model_max_length=max_length)


def build_pipeline(small: bool) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tok = tokenizer(16 if small else 77)
    if small:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=16, vocab_size=len(tok))
        unet = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                    attention_head_dim=8, norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        vae = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    else:  # Stable Diffusion 1.5's configs
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
        unet = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    cross_attention_dim=768, attention_head_dim=8,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                pad_token_id=tok.pad_token_id, **text))
    return StableDiffusionPipeline(
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215, **vae),
        text_encoder=text_encoder, tokenizer=tok,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **unet),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                set_alpha_to_one=False, steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def draw(backend, prompts: list[str], seed: int, settings: SamplerSettings) -> torch.Tensor:
    return generate(backend, prompts, settings, seed=seed)  # what the app's Generate tab runs


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean(dim=(1, 2))


class Meter:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = round(time.perf_counter() - self.t0, 3)
        self.peak_gb = round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/real_model_gpu.json"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", default="rlr:auto,ddpo,truncated-bp,full-bp",
                    help="estimators to time, comma-separated; rlr:<h> or rlr:auto sets RLR's block")
    ap.add_argument("--no-export", action="store_true", help="skip the LoRA export comparison")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.allow_tf32 = False  # the fp32 comparison below wants fp32 convolutions
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "sampling_steps": args.steps}
    folder = Path(tempfile.mkdtemp()) / ("tiny-sd" if args.small else "sd15-random")
    with Meter("cpu") as m:
        pipe = build_pipeline(args.small)
        pipe.to(torch.float16).save_pretrained(folder)  # half the disk; loading upcasts exactly
        del pipe
    result["build_and_save_s"] = m.seconds

    with Meter(device) as m:
        backend = load_backend(folder, device, "auto")
    h, w = backend.image_size
    result["load"] = {"seconds": m.seconds, "dtype": str(backend.dtype), "image_size": [h, w],
                      "unet_params_m": round(sum(p.numel() for p in backend.unet.parameters()) / 1e6, 1)}
    print(json.dumps(result), flush=True)

    draw(backend, [PROMPT], 0, SamplerSettings(steps=2, guidance=7.5))  # warm-up
    result["generate"] = {}
    for batch in (1, 4):
        with Meter(device) as m:
            draw(backend, [PROMPT] * batch, 0, SamplerSettings(steps=args.steps, guidance=7.5))
        result["generate"][f"batch{batch}"] = {"seconds": m.seconds, "peak_gb": m.peak_gb}
        print(json.dumps(result["generate"]), flush=True)

    result["train"] = {}
    for spec in args.runs.split(","):
        name, _, arg = spec.partition(":")
        options = {"rlr": {"block": arg if arg == "auto" else int(arg or 2)},
                   "truncated-bp": {"steps": 1}}.get(name, {})
        trainee = copy.deepcopy(backend)
        config = TrainConfig(estimator=EstimatorConfig(name, options), steps=1, batch=2, prompts=[PROMPT],
                             sampler=SamplerSettings(steps=args.steps, eta=1.0, guidance=1.0), lr=1e-4)
        try:
            with Meter(device) as m:
                out = run_round(trainee, redness, config, folder.parent / f"v-{name}")
            row = out.metrics["history"][0]
            result["train"][spec] = {"seconds_per_step": m.seconds, "peak_gb": m.peak_gb,
                                     **{k: row[k] for k in ("block", "tail") if k in row}}
        except Exception as err:  # e.g. out of memory: recorded, the others still run
            result["train"][spec] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        print(spec, json.dumps(result["train"][spec]), flush=True)
        del trainee
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.no_export:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return
    # A version with a clearly non-zero LoRA, then: the app's fp32 version vs a plain fp32 pipeline.
    trainee = copy.deepcopy(backend)
    lora.add_lora(trainee, rank=4, seed=0)
    with torch.no_grad():
        for n, p in trainee.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    version = lora.write_version(trainee, folder.parent / "v-export", "lora", {}, {})
    del trainee, backend
    ours32 = load_backend(folder, device, "fp32")
    settings = SamplerSettings(steps=20, guidance=7.5)
    base = draw(ours32, [PROMPT] * 2, 3, settings)
    lora.apply_version(ours32, version)
    ours = draw(ours32, [PROMPT] * 2, 3, settings)
    del ours32
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(version)
    plain = pipe([PROMPT] * 2, num_inference_steps=20, guidance_scale=7.5, eta=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(3)).images.cpu()
    result["lora_export"] = {"max_abs_diff_vs_plain_pipeline": float((ours - plain).abs().max()),
                             "max_abs_change_from_base": float((ours - base).abs().max())}
    print(json.dumps(result["lora_export"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
