"""Command-line flags and environment variables of ``python app.py``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

# Not imported from rlr_core.shapesworld.model: `python app.py --help` should not wait for torch.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "shapesworld-tiny"


@dataclass
class AppConfig:
    model: str = str(DEFAULT_MODEL_DIR)
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    device: str = "cpu"
    dtype: str = "auto"  # auto|fp32|fp16|bf16: the weights' precision (rlr_core.backends.loading)
    reward_encoder: str = "auto"  # the reward proxy's image encoder (rlr_core.feedback.encoders)
    threads: int = 1
    admin_password: str | None = None
    # A public app (--share, or running on a Space) guards model-changing actions.
    public: bool = False
    auto_train_every: int = 0

    @property
    def needs_admin(self) -> bool:
        return self.public


def _env(name: str, default: str) -> str:
    return os.environ.get(f"RLR_{name}", default)


def _flag(name: str) -> bool:
    return _env(name, "").lower() in {"1", "true", "yes", "on"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python app.py",
        description="Rate diffusion samples in the browser; the app learns a reward from your "
        "ratings and fine-tunes the model with RLR in the background. Every flag can also be "
        "set by an environment variable (shown in brackets).",
        epilog="Public apps (--share or a Hugging Face Space) ask for the admin password "
        "RLR_ADMIN_PASSWORD before training, switching model versions, or importing data; "
        "rating stays open to everyone.",
    )
    p.add_argument("--model", default=_env("MODEL", str(DEFAULT_MODEL_DIR)),
                   help="the model: the built-in model folder, a diffusers Stable Diffusion pipeline folder, "
                   "a hub id (org/name; taken from the local Hugging Face cache when offline) or a "
                   "single-file .safetensors checkpoint [RLR_MODEL] (default: the ShapesWorld model shipped "
                   "in models/shapesworld-tiny)")
    p.add_argument("--dtype", default=_env("DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"],
                   help="weight precision of a diffusers model [RLR_DTYPE] (default: auto = fp16 or bf16 on "
                   "CUDA, fp32 on CPU)")
    p.add_argument("--reward-encoder", default=_env("REWARD_ENCODER", "auto"),
                   help="image features the reward proxy learns from: perception (the built-in model's), "
                   "clip:<hub id or folder> (CLIP, from a folder or the local cache), vae (the model's own VAE "
                   "latents: colour and layout, no meaning) or auto = perception for the built-in model, "
                   "else a CLIP found in the local cache, else vae [RLR_REWARD_ENCODER] (default: auto)")
    p.add_argument("--data-dir", type=Path, default=Path(_env("DATA_DIR", "data")),
                   help="where the ratings database, images and model versions live [RLR_DATA_DIR] "
                   "(default: ./data)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for every interface [RLR_HOST] (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("PORT", "7860")), help="[RLR_PORT] (default: 7860)")
    p.add_argument("--share", action="store_true", default=_flag("SHARE"),
                   help="make a public Gradio link; model-changing actions then need the admin "
                   "password [RLR_SHARE=1]")
    p.add_argument("--device", default=_env("DEVICE", "auto"),
                   help="cpu, cuda, cuda:1 or auto [RLR_DEVICE] (default: auto = cuda if available)")
    p.add_argument("--threads", type=int, default=int(_env("THREADS", "1")),
                   help="torch CPU threads for generation and training; keep it below the core count "
                   "so the UI keeps a core [RLR_THREADS] (default: 1)")
    p.add_argument("--auto-train-every", type=int, default=int(_env("AUTO_TRAIN_EVERY", "0")),
                   help="start a training round after every N new ratings and comparisons; 0 = off "
                   "(can be changed in the Train tab) [RLR_AUTO_TRAIN_EVERY] (default: 0)")
    return p


def parse_args(argv: list[str] | None = None) -> AppConfig:
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    if args.auto_train_every < 0:
        raise SystemExit("--auto-train-every must be 0 (off) or a positive number")
    return AppConfig(
        model=args.model, data_dir=args.data_dir, host=args.host, port=args.port, share=args.share,
        device=resolve_device(args.device), dtype=args.dtype, reward_encoder=args.reward_encoder,
        threads=args.threads,
        admin_password=os.environ.get("RLR_ADMIN_PASSWORD") or None,
        public=args.share or bool(os.environ.get("SPACE_ID")),
        auto_train_every=args.auto_train_every,
    )


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
