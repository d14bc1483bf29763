"""Command-line flags and environment variables of ``python app.py``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

# Not imported from rlr_core.shapesworld.model: `python app.py --help` should not wait for torch.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "shapesworld-tiny"
DEFAULT_QUEUE_SIZE = 256


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
    # Requests waiting in Gradio's queue past which a new one is answered "busy, try again"
    # (HTTP 503) at once instead of waiting; docs/deploy.md, "Queue limits".
    queue_size: int = DEFAULT_QUEUE_SIZE
    # Running on a Hugging Face Space (SPACE_ID): raters may sign in with Hugging Face.
    space: bool = False
    admins: tuple[str, ...] = ()  # HF usernames with admin rights once signed in (RLR_ADMINS)

    @property
    def needs_admin(self) -> bool:
        return self.public


class ConfigError(ValueError):
    """A start-up setting that cannot work; ``app.py`` prints it as one line and exits with code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise ConfigError(f"{message} (python app.py --help lists the options)")


def _setting(args: argparse.Namespace, flag: str, env: str, default: str) -> tuple[str, str]:
    """The value of a setting and where it came from: the flag, else RLR_<env>, else the default."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is not None:
        return value, flag
    name = f"RLR_{env}"
    if os.environ.get(name, "").strip():  # set and not empty
        return os.environ[name], f"{name} (the {flag} setting)"
    return default, flag


def _whole(value: str, source: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        n = None
    if n is None or not lo <= n <= hi:
        raise ConfigError(f"{source} must be a whole number from {lo} to {hi}, not {value!r}")
    return n


def _choice(value: str, source: str, choices: tuple[str, ...]) -> str:
    if value.strip().lower() not in choices:
        raise ConfigError(f"{source} must be one of {', '.join(choices)}, not {value!r}")
    return value.strip().lower()


def _flag(name: str) -> bool:
    value = os.environ.get(f"RLR_{name}", "").strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"", "0", "false", "no", "off"}:
        return False
    raise ConfigError(f"RLR_{name} must be 1/true/yes/on or 0/false/no/off, not {os.environ[f'RLR_{name}']!r}")


def build_parser() -> argparse.ArgumentParser:
    # Defaults are resolved after parsing (see parse_args), so a bad environment value gets a
    # clear message naming it, and --help works whatever the environment holds.
    p = _Parser(
        prog="python app.py",
        description="Rate diffusion samples in the browser; the app learns a reward from your "
        "ratings and fine-tunes the model with RLR in the background. Every flag can also be "
        "set by an environment variable (shown in brackets).",
        epilog="Public apps (--share or a Hugging Face Space) ask for the admin password "
        "RLR_ADMIN_PASSWORD (or, on a Space, sign-in as one of the Hugging Face users listed in "
        "RLR_ADMINS, comma-separated) before training, switching model versions, importing or "
        "exporting data; rating stays open to everyone. See docs/security.md.",
    )
    p.add_argument("--model",
                   help="the model: the built-in model folder, the built-in clip model folder "
                   "(models/shapesworld-clips: a video app), a diffusers Stable Diffusion pipeline folder, "
                   "a hub id (org/name; taken from the local Hugging Face cache when offline) or a "
                   "single-file .safetensors checkpoint [RLR_MODEL] (default: the ShapesWorld model shipped "
                   "in models/shapesworld-tiny)")
    p.add_argument("--dtype", help="weight precision of a diffusers model: auto, fp32, fp16 or bf16 [RLR_DTYPE] "
                   "(default: auto = bf16 or fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--reward-encoder",
                   help="image features the reward proxy learns from: perception (the built-in model's), "
                   "clip:<hub id or folder> (CLIP, from a folder or the local cache), vae (the model's own VAE "
                   "latents: colour and layout, no meaning) or auto = perception for the built-in model, "
                   "else a CLIP found in the local cache, else vae [RLR_REWARD_ENCODER] (default: auto)")
    p.add_argument("--data-dir", help="where the ratings database, images and model versions live [RLR_DATA_DIR] "
                   "(default: ./data)")
    p.add_argument("--host", help="address to listen on; 0.0.0.0 for every interface [RLR_HOST] "
                   "(default: 127.0.0.1)")
    p.add_argument("--port", help="[RLR_PORT] (default: 7860)")
    p.add_argument("--share", action="store_true", default=None,
                   help="make a public Gradio link; model-changing actions then need the admin "
                   "password [RLR_SHARE=1]")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto [RLR_DEVICE] (default: auto = cuda if available)")
    p.add_argument("--threads", help="torch CPU threads for generation and training; keep it below the core count "
                   "so the UI keeps a core [RLR_THREADS] (default: 1)")
    p.add_argument("--auto-train-every",
                   help="start a training round after every N new ratings and comparisons; 0 = off "
                   "(can be changed in the Train tab) [RLR_AUTO_TRAIN_EVERY] (default: 0)")
    p.add_argument("--queue-size",
                   help="requests that may wait in the queue; past it a new one is told the app is busy "
                   f"(try again) at once instead of waiting [RLR_QUEUE_SIZE] (default: {DEFAULT_QUEUE_SIZE})")
    return p


def parse_args(argv: list[str] | None = None) -> AppConfig:
    """The app's settings from the flags and the environment; :class:`ConfigError` when one cannot work."""
    args = build_parser().parse_args(argv)
    get = lambda flag, env, default: _setting(args, flag, env, default)
    port = _whole(*get("--port", "PORT", "7860"), 1, 65535)
    threads = _whole(*get("--threads", "THREADS", "1"), 1, 1024)
    auto_train = _whole(*get("--auto-train-every", "AUTO_TRAIN_EVERY", "0"), 0, 100_000)
    queue_size = _whole(*get("--queue-size", "QUEUE_SIZE", str(DEFAULT_QUEUE_SIZE)), 1, 100_000)
    share = bool(args.share) or _flag("SHARE")
    return AppConfig(
        model=get("--model", "MODEL", str(DEFAULT_MODEL_DIR))[0],
        data_dir=Path(get("--data-dir", "DATA_DIR", "data")[0]),
        host=get("--host", "HOST", "127.0.0.1")[0], port=port, share=share,
        device=resolve_device(*get("--device", "DEVICE", "auto")), threads=threads,
        dtype=_choice(*get("--dtype", "DTYPE", "auto"), ("auto", "fp32", "fp16", "bf16")),
        reward_encoder=get("--reward-encoder", "REWARD_ENCODER", "auto")[0],
        admin_password=os.environ.get("RLR_ADMIN_PASSWORD") or None,
        public=share or bool(os.environ.get("SPACE_ID")),
        auto_train_every=auto_train, queue_size=queue_size,
        space=bool(os.environ.get("SPACE_ID")),
        admins=tuple(a.strip() for a in os.environ.get("RLR_ADMINS", "").split(",") if a.strip()),
    )


def resolve_device(device: str, source: str = "--device") -> str:
    """cpu, cuda, cuda:N or auto (cuda when torch sees a GPU); a GPU that is not there is an error."""
    device = device.strip().lower()
    if device == "cpu":
        return device
    if device != "auto" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"{source} must be cpu, cuda, cuda:N or auto, not {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"{source} is {device}, but torch sees no CUDA GPU on this machine: "
                          "use --device cpu (or auto)")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{source} is {device}, but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def check_port(host: str, port: int) -> None:
    """Fail at once, before the model loads, when the port cannot be listened on (as the server would)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed socket's TIME_WAIT is fine
            s.bind((host, port))
    except socket.gaierror:
        raise ConfigError(f"--host {host}: no such address on this machine (RLR_HOST sets it too)") from None
    except OSError as err:
        raise ConfigError(port_in_use(host, port, err.strerror)) from None


def port_in_use(host: str, port: int, reason: str | None = "address already in use") -> str:
    return (f"cannot listen on {host}:{port} ({(reason or 'in use').lower()}): another program may be using "
            f"it; pick another port with --port or RLR_PORT")
