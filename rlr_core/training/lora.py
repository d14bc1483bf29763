"""LoRA adapters on a backend's denoiser (through peft), and model versions on disk.

A version folder holds what one training round produced:

    pytorch_lora_weights.safetensors    (LoRA, in diffusers' format: "unet."-prefixed keys, the
                                         LoRA config in the file's metadata)
    or denoiser.safetensors             (full fine-tuning: every denoiser weight)
    config.json                         (kind, base model, the round's settings)
    metrics.json                        (what the round measured)

The LoRA file is what ``StableDiffusionPipeline.save_lora_weights`` writes, so a plain diffusers
pipeline of the same base model loads a version with ``pipe.load_lora_weights(folder)``
(``StableDiffusionXLPipeline`` and ``AnimateDiffPipeline`` write and read the same "unet." keys for a
UNet-only LoRA: tests/test_sdxl_backend.py and tests/test_animatediff.py load them), and the
app loads it the same way (``unet.load_lora_adapter``). Folders from before this format
(``adapter_model.safetensors`` + ``adapter_config.json``, peft's) still load.

Versions are written to a temporary folder and renamed into place, so a folder that exists is
always complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from rlr_core.backends.base import DiffusionBackend

ADAPTER_NAME = "rlr"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default name
PEFT_WEIGHTS = "adapter_model.safetensors"  # the older, peft-format version folders
FULL_WEIGHTS = "denoiser.safetensors"


def add_lora(backend: DiffusionBackend, rank: int = 4, alpha: float | None = None,
             adapter_name: str = ADAPTER_NAME, seed: int | None = None) -> list[torch.nn.Parameter]:
    """Freeze the denoiser and wrap its attention projections with a fresh LoRA adapter.

    peft's "gaussian" init draws A and zeroes B, so the model is unchanged until trained.
    Returns the adapter's (trainable) parameters."""
    unet = backend.denoiser
    if has_lora(backend, adapter_name):
        remove_lora(backend, adapter_name)
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=backend.lora_target_modules)
    if seed is not None:
        torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name=adapter_name)
    unet.set_adapter(adapter_name)
    _adapter_in_fp32(backend, adapter_name)
    return lora_parameters(backend, adapter_name)


def _adapter_in_fp32(backend: DiffusionBackend, adapter_name: str) -> None:
    """Adapter weights in fp32 over fp16/bf16 base weights: half-precision AdamW updates of small
    LoRA weights round to nothing (the forward runs under autocast, see backends.latent)."""
    for p in lora_parameters(backend, adapter_name):
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def lora_parameters(backend: DiffusionBackend, adapter_name: str = ADAPTER_NAME) -> list[torch.nn.Parameter]:
    """The adapter's weights (lora_A / lora_B of every wrapped layer)."""
    return [p for n, p in backend.denoiser.named_parameters()
            if f"lora_A.{adapter_name}." in n or f"lora_B.{adapter_name}." in n]


def has_lora(backend: DiffusionBackend, adapter_name: str = ADAPTER_NAME) -> bool:
    return adapter_name in getattr(backend.denoiser, "peft_config", {})


def remove_lora(backend: DiffusionBackend, adapter_name: str = ADAPTER_NAME) -> None:
    """Drop the adapter: the denoiser is the base model again."""
    if has_lora(backend, adapter_name):
        backend.denoiser.delete_adapters(adapter_name)


def lora_state_dict(backend: DiffusionBackend, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(backend.denoiser, adapter_name=adapter_name)


def save_weights(backend: DiffusionBackend, folder: Path, kind: str, adapter_name: str = ADAPTER_NAME) -> None:
    """Write the trainable weights of ``kind`` ("lora" or "full") into ``folder``."""
    if kind == "lora":
        from diffusers import StableDiffusionPipeline  # its LoRA writer is a classmethod: no pipeline needed

        state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(backend, adapter_name).items()}
        if backend.lora_prefix == "transformer":  # flow models: "transformer."-prefixed keys
            import diffusers

            # the model's own pipeline class writes it (StableDiffusion3Pipeline, FluxPipeline)
            writer = getattr(diffusers, backend.lora_pipeline)
            writer.save_lora_weights(
                str(folder), transformer_lora_layers=state, weight_name=LORA_WEIGHTS, safe_serialization=True,
                transformer_lora_adapter_metadata=backend.denoiser.peft_config[adapter_name].to_dict())
            return
        StableDiffusionPipeline.save_lora_weights(
            str(folder), unet_lora_layers=state, weight_name=LORA_WEIGHTS, safe_serialization=True,
            # Without the adapter's config diffusers would reload lora_alpha as the rank.
            unet_lora_adapter_metadata=backend.denoiser.peft_config[adapter_name].to_dict())
    elif kind == "full":
        state = backend.denoiser.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / FULL_WEIGHTS)
    else:
        raise ValueError(f"unknown version kind {kind!r}")


def write_version(backend: DiffusionBackend, folder: str | Path, kind: str, config: dict, metrics: dict,
                  adapter_name: str = ADAPTER_NAME) -> Path:
    """Save a complete version folder atomically (temporary folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(backend, tmp, kind, adapter_name)
    meta = {"kind": kind, "base_model": backend.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **config}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_version(folder: str | Path) -> tuple[dict, dict]:
    folder = Path(folder)
    return (json.loads((folder / "config.json").read_text()), json.loads((folder / "metrics.json").read_text()))


def load_lora(backend: DiffusionBackend, folder: str | Path, adapter_name: str = ADAPTER_NAME) -> None:
    """Attach the LoRA adapter saved in ``folder`` (replacing one of the same name)."""
    folder = Path(folder)
    remove_lora(backend, adapter_name)
    unet = backend.denoiser
    unet.requires_grad_(False)  # only the adapter is trainable, as after add_lora
    if (folder / LORA_WEIGHTS).is_file():
        n_saved = len(load_file(folder / LORA_WEIGHTS))
        # The loader a plain diffusers pipeline uses (load_lora_weights calls it for the UNet).
        unet.load_lora_adapter(str(folder), weight_name=LORA_WEIGHTS, prefix=backend.lora_prefix,
                               adapter_name=adapter_name)
        if len(lora_parameters(backend, adapter_name)) != n_saved:
            remove_lora(backend, adapter_name)
            raise ValueError(f"{folder}: adapter weights do not fit this model")
    else:  # a peft-format folder
        config = LoraConfig.from_pretrained(str(folder))
        unet.add_adapter(config, adapter_name=adapter_name)
        state = load_file(folder / PEFT_WEIGHTS, device=str(backend.device))
        result = set_peft_model_state_dict(unet, state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{folder}: adapter weights do not fit this model ({len(unexpected)} unexpected keys)")
    unet.set_adapter(adapter_name)
    _adapter_in_fp32(backend, adapter_name)


def apply_version(backend: DiffusionBackend, folder: str | Path, adapter_name: str = ADAPTER_NAME) -> dict:
    """Make ``backend`` the model saved in the version ``folder``; returns the version's config.

    LoRA versions replace the current adapter. Full versions overwrite the denoiser's weights
    (reload the base model to undo)."""
    folder = Path(folder)
    config, _ = read_version(folder)
    if config["kind"] == "lora":
        load_lora(backend, folder, adapter_name)
    elif config["kind"] == "full":
        remove_lora(backend, adapter_name)
        state = load_file(folder / FULL_WEIGHTS, device=str(backend.device))
        backend.denoiser.load_state_dict(state, strict=True)
    else:
        raise ValueError(f"{folder}: unknown version kind {config['kind']!r}")
    backend.denoiser.eval()
    return config


def scale_back(backend: DiffusionBackend, parent: DiffusionBackend, kind: str, keep: float = 0.5) -> None:
    """Pull ``backend``'s trained weights toward ``parent``'s: w = parent + keep * (w - parent).

    LoRA: the adapter's A and B are blended key by key; where the parent has no adapter (the
    base model) only B moves (to keep * B), so the weight change B @ A scales by exactly
    ``keep``; between two adapters the change moves along the straight line in (A, B), from
    the parent's at 0 to the trained one's at 1. Full versions: every denoiser weight.
    Applied twice, it keeps ``keep ** 2`` of the round's change in those weights."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be within [0, 1], got {keep}")
    reference = parent.denoiser.state_dict()
    with torch.no_grad():
        for name, weight in backend.denoiser.state_dict(keep_vars=True).items():
            if not weight.is_floating_point() or (kind == "lora" and "lora_" not in name):
                continue
            if name in reference:
                target = reference[name].to(weight.device, weight.dtype)
            elif "lora_B" in name:  # the parent has no adapter: its change is B = 0
                target = torch.zeros_like(weight)
            else:  # lora_A without a parent adapter: B alone carries the scale
                continue
            weight.lerp_(target, 1.0 - keep)
