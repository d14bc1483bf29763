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
    threads: int = 1
    admin_password: str | None = None
    # A public app (--share, or running on a Space) guards model-changing actions.
    public: bool = False
    auto_train_every: int = 0
    # Running on a Hugging Face Space (SPACE_ID): raters may sign in with Hugging Face.
    space: bool = False
    admins: tuple[str, ...] = ()  # HF usernames with admin rights once signed in (RLR_ADMINS)

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
        "RLR_ADMIN_PASSWORD (or, on a Space, sign-in as one of the Hugging Face users listed in "
        "RLR_ADMINS, comma-separated) before training, switching model versions, importing or "
        "exporting data; rating stays open to everyone. See docs/security.md.",
    )
    p.add_argument("--model", default=_env("MODEL", str(DEFAULT_MODEL_DIR)),
                   help="built-in model folder [RLR_MODEL] (default: the ShapesWorld model shipped "
                   "in models/shapesworld-tiny)")
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
        device=resolve_device(args.device), threads=args.threads,
        admin_password=os.environ.get("RLR_ADMIN_PASSWORD") or None,
        public=args.share or bool(os.environ.get("SPACE_ID")),
        auto_train_every=args.auto_train_every,
        space=bool(os.environ.get("SPACE_ID")),
        admins=tuple(a.strip() for a in os.environ.get("RLR_ADMINS", "").split(",") if a.strip()),
    )


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
