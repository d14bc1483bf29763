"""AnimateDiff behind the backend interface: Stable Diffusion 1.5 plus a motion adapter.

The denoiser is diffusers' ``UNetMotionModel`` (SD's UNet with AnimateDiff's temporal layers);
the diffusion state is the latent clip (C, F, h, w), diffusers' own layout, and ``decode`` gives
frames (B, F, 3, H, W) in [0, 1], differentiably (VAE decode, frame by frame in chunks). Prompts,
precision and LoRA work as for the latent image backend this class extends.

    backend = AnimateDiffBackend.from_pretrained("./my-animatediff-folder", device="cuda", dtype=torch.bfloat16)

A folder is what ``AnimateDiffPipeline.save_pretrained`` writes (``model_index.json`` with
``_class_name`` AnimateDiffPipeline, ``unet/`` a UNetMotionModel, ``motion_adapter/``, ...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, AutoencoderKL, UNetMotionModel
from torch.utils.checkpoint import checkpoint

from rlr_core.backends.latent import DiffusersLatentBackend
from rlr_core.backends.load_errors import ModelLoadError, first_line, model_name

DEFAULT_FRAMES = 16  # AnimateDiff's usual clip length (the v1.5 adapters were trained on 16)
DECODE_CHUNK = 4  # frames per VAE call while training: the reward's backward holds one chunk


class AnimateDiffBackend(DiffusersLatentBackend):
    """A latent video backend: clips of ``num_frames`` frames from an AnimateDiff pipeline."""

    family = "animatediff"
    is_video = True

    def __init__(self, unet: UNetMotionModel, vae: AutoencoderKL, text_encoder: torch.nn.Module, tokenizer,
                 scheduler, name: str = "animatediff", num_frames: int | None = None):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, name)
        limit = max_frames(unet)
        self.num_frames = int(num_frames) if num_frames is not None else min(DEFAULT_FRAMES, limit)
        if not 1 <= self.num_frames <= limit:
            raise ValueError(f"num_frames must be 1..{limit} (the motion adapter's positions), "
                             f"got {self.num_frames}")
        self.checkpoint_decode = False

    @classmethod
    def from_pipeline(cls, pipe: AnimateDiffPipeline, name: str | None = None,
                      num_frames: int | None = None) -> AnimateDiffBackend:
        if not isinstance(pipe.unet, UNetMotionModel):
            raise TypeError(f"an AnimateDiff pipeline's unet must be a UNetMotionModel, got {type(pipe.unet).__name__}")
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                   name or getattr(pipe, "name_or_path", None) or "animatediff", num_frames)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, num_frames: int | None = None) -> AnimateDiffBackend:
        pipe = AnimateDiffPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                   use_safetensors=True)
        pipe.to(device)
        return cls.from_pipeline(pipe, name=str(path), num_frames=num_frames)

    @property
    def lora_target_modules(self) -> list[str]:
        # The attention projections of the image layers and of the temporal (motion) layers alike:
        # diffusers' AnimateDiffPipeline.load_lora_weights loads both.
        return ["to_q", "to_k", "to_v", "to_out.0"]

    @property
    def frames(self) -> int:
        return self.num_frames

    @property
    def state_shape(self) -> tuple[int, ...]:
        c, h, w = super().state_shape
        return (c, self.num_frames, h, w)

    @property
    def image_size(self) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = self.state_shape[-2:]
        return (h * factor, w * factor)

    def model_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        # diffusers 0.42.1's UNetMotionModel does not repeat the text over frames: it takes
        # (batch x frames, tokens, dim), batch-major, as AnimateDiffPipeline passes it.
        return super().model_output(x, t, cond.repeat_interleave(x.shape[2], dim=0))

    def prepare_for_training(self, gradient_checkpointing: bool | None = None) -> None:
        """Gradient checkpointing in the motion UNet and the VAE, and a decode in checkpointed
        chunks of frames (default: on CUDA): 16 frames at 512x512 otherwise keep every frame's
        decoder activations for the reward's backward."""
        if gradient_checkpointing is None:
            gradient_checkpointing = self.device.type == "cuda"
        super().prepare_for_training(gradient_checkpointing)
        self.checkpoint_decode = bool(gradient_checkpointing)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Latent clips (B, C, F, h, w) -> frames (B, F, 3, H, W) in [0, 1]."""
        b, c, f, h, w = x0.shape
        flat = x0.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        chunk = DECODE_CHUNK if self.checkpoint_decode else b * f
        parts = []
        for start in range(0, b * f, chunk):
            piece = flat[start:start + chunk]
            if self.checkpoint_decode and torch.is_grad_enabled() and piece.requires_grad:
                parts.append(checkpoint(super().decode, piece, use_reentrant=False))
            else:
                parts.append(super().decode(piece))
        frames = torch.cat(parts)
        return frames.reshape(b, f, *frames.shape[1:])


def max_frames(unet: UNetMotionModel) -> int:
    """The most frames the motion modules have positions for."""
    return int(unet.config.get("motion_max_seq_length") or 32)


# ---------------------------------------------------------------------------- loading (--model)
PIPELINE_CLASS = "AnimateDiffPipeline"
NEEDED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "motion_adapter")
BUILD_HINT = ("AnimateDiffPipeline.from_pretrained(SD_1_5, motion_adapter=MotionAdapter.from_pretrained(ADAPTER))"
              ".save_pretrained(FOLDER)")


def is_motion_adapter_folder(path: Path) -> bool:
    """A MotionAdapter on its own (what AnimateDiff's hub repositories hold), not a pipeline."""
    import json

    config = path / "config.json"
    if (path / "model_index.json").is_file() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "MotionAdapter"
    except (OSError, ValueError, AttributeError):
        return False


def load_folder(path: Path, label: str, meta: dict, device, dtype: torch.dtype,
                num_frames: int | None = None) -> AnimateDiffBackend:
    """The backend for an AnimateDiff pipeline folder; every failure is one ``ModelLoadError`` line."""
    if is_motion_adapter_folder(path):
        raise ModelLoadError(f"--model {label}: a motion adapter on its own, not a whole AnimateDiff pipeline; "
                             f"join it to a Stable Diffusion 1.5 pipeline once with {BUILD_HINT} and pass FOLDER")
    cls_name = meta.get("_class_name")
    if cls_name != PIPELINE_CLASS:
        raise ModelLoadError(f"--model {label}: a {cls_name} is not served; video needs an {PIPELINE_CLASS} folder "
                             "(Stable Diffusion 1.5 + a motion adapter)")
    missing = [c for c in NEEDED if not (isinstance(meta.get(c), list) and meta[c][0])]
    if missing:
        raise ModelLoadError(f"--model {label}: this {PIPELINE_CLASS} folder lacks {', '.join(missing)}; "
                             f"it needs {', '.join(NEEDED)}")
    try:
        # safetensors only: a folder's .bin weights are pickles, which can run code when loaded
        pipe = AnimateDiffPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                   use_safetensors=True)
    except Exception as err:
        raise ModelLoadError(f"--model {label}: the {PIPELINE_CLASS} in {path} did not load "
                             f"({type(err).__name__}: {first_line(err)})") from None
    name = model_name(label, path)
    try:
        pipe.to(device)
    except Exception as err:
        raise ModelLoadError(f"--model {name}: could not move the model to {device} ({first_line(err)})") from None
    try:
        return AnimateDiffBackend.from_pipeline(pipe, name=name, num_frames=num_frames)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"--model {label}: {first_line(err)}") from None
