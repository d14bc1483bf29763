"""Write a ready-to-push Hugging Face Space folder: ``python -m app.space OUT``.

The folder holds the app (app/, rlr_core/, feedback_store/, app.py), the built-in model,
the perception and presence models (models/), a ``requirements.txt`` and a ``README.md`` whose front matter
configures the Space (Gradio SDK pinned to the Gradio in requirements.txt, sign-in with Hugging
Face, suggested hardware). Its entry ``space_app.py`` imports ``spaces`` before torch (ZeroGPU
needs that), listens on 0.0.0.0 and runs ``app.py``. Push it with

    hf upload <user>/<space> OUT . --type space

(docs/deploy.md walks through it, with storage, secrets and hardware).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["app", "rlr_core", "feedback_store"]
MODELS = ["models/shapesworld-tiny", "models/perception", "models/presence"]
FILES = ["app.py"]
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")
PYTHON_VERSION = "3.11"
SPACES_PIN = "spaces==0.51.3"
# suggested_hardware is a hint shown to whoever duplicates the Space; these are the ones the app suits.
HARDWARE = ["zero-a10g", "cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "a10g-small",
            "a10g-large", "a100-large", "h100"]
SHORT_DESCRIPTION = "Rate images; RLR fine-tunes the diffusion model on them"

ENTRY = '''"""Entry point of the Hugging Face Space (written by ``python -m app.space``)."""

import os
import runpy

os.environ.setdefault("RLR_HOST", "0.0.0.0")  # a Space routes to the container's port 7860
if os.environ.get("SPACES_ZERO_GPU"):
    # ZeroGPU: the app's process keeps the weights on the CPU; spaces.GPU calls move a copy.
    os.environ.setdefault("RLR_DEVICE", "cpu")
try:
    import spaces  # noqa: F401  (before torch: ZeroGPU patches CUDA start-up)
except ImportError:  # an install without it (the decorator is a no-op off ZeroGPU anyway)
    pass

import app.zerogpu  # noqa: E402,F401  (defines the spaces.GPU functions ZeroGPU looks for at start-up)

runpy.run_path("app.py", run_name="__main__")
'''


def pinned(requirements: str, package: str) -> str | None:
    """The version ``package==X`` pins in a requirements text, if any."""
    m = re.search(rf"^\s*{re.escape(package)}\s*==\s*([^\s;#]+)", requirements, re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def space_requirements(requirements: str) -> str:
    """The project's requirements (comments dropped) plus ``spaces``; torch keeps its exact pin, which
    installs the CUDA build on a Space's Linux image (ZeroGPU and GPU hardware need it; on CPU
    hardware it runs on the CPU)."""
    lines = [ln.strip() for ln in requirements.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not pinned(requirements, "torch"):
        raise SystemExit("requirements.txt must pin torch (torch==X): an unpinned torch may not match ZeroGPU")
    if not any(re.match(r"^spaces\b", ln) for ln in lines):
        lines.append(SPACES_PIN)
    return "\n".join(lines) + "\n"


def readme(gradio_version: str, hardware: str, title: str) -> str:
    front = {
        "title": title, "emoji": "🎨", "colorFrom": "indigo", "colorTo": "pink",
        "sdk": "gradio", "sdk_version": gradio_version, "python_version": PYTHON_VERSION,
        "app_file": "space_app.py", "hf_oauth": "true", "suggested_hardware": hardware,
        "short_description": SHORT_DESCRIPTION, "pinned": "false",
    }
    yaml = "\n".join(f"{k}: {_yaml_value(v)}" for k, v in front.items())
    return f"""---
{yaml}
---

# {title}

Rate the images a small text-to-image diffusion model draws; the app learns a reward from the
ratings and fine-tunes the model with the Recursive Likelihood Ratio (RLR) optimizer.

- Sign in with Hugging Face to rate under your username (guests get a random id kept in the browser).
- Training, switching model versions and importing data are for admins: the Hugging Face usernames
  in the `RLR_ADMINS` variable, or anyone with the `RLR_ADMIN_PASSWORD` secret.
- Data lives in `RLR_DATA_DIR` (mount a Storage Bucket there); without it, data is lost on restart.

Built with `python -m app.space`; see docs/deploy.md in the project for storage, secrets and hardware.
"""


def _yaml_value(v: str) -> str:
    if v in ("true", "false") or re.fullmatch(r"[A-Za-z0-9_.-]+", v) and not re.fullmatch(r"[\d.]+", v):
        return v
    return '"' + v.replace('"', '\\"') + '"'


def build(out: Path, hardware: str = "zero-a10g", title: str = "RLR feedback", force: bool = False) -> Path:
    """Write the Space folder ``out``; returns it."""
    if hardware not in HARDWARE:
        raise SystemExit(f"--hardware must be one of {', '.join(HARDWARE)}")
    out = out.resolve()
    if out == ROOT or any(out == ROOT / r or ROOT / r in out.parents for r in [*PACKAGES, "models"]):
        raise SystemExit(f"refusing to write the Space into the project itself ({out})")
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"{out} is not empty; pass --force to replace the Space files in it")
    requirements = (ROOT / "requirements.txt").read_text()
    gradio_version = pinned(requirements, "gradio")
    if not gradio_version:
        raise SystemExit("requirements.txt must pin gradio (gradio==X): the Space's sdk_version is that pin")
    out.mkdir(parents=True, exist_ok=True)
    for rel in [*PACKAGES, *MODELS]:
        dest = out / rel
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / rel, dest, ignore=SKIP)
    for rel in FILES:
        shutil.copy2(ROOT / rel, out / rel)
    (out / "space_app.py").write_text(ENTRY)
    (out / "requirements.txt").write_text(space_requirements(requirements))
    (out / "README.md").write_text(readme(gradio_version, hardware, title))
    (out / ".gitignore").write_text("data/\n__pycache__/\n*.pyc\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                        "*.png filter=lfs diff=lfs merge=lfs -text\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m app.space", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to write (empty, or use --force)")
    p.add_argument("--hardware", default="zero-a10g",
                   help="suggested_hardware in the front matter (default: zero-a10g = ZeroGPU; the "
                   "built-in model also runs on cpu-basic)")
    p.add_argument("--title", default="RLR feedback", help="the Space's title")
    p.add_argument("--force", action="store_true", help="replace the Space files in a non-empty folder")
    args = p.parse_args(argv)
    out = build(args.out, args.hardware, args.title, args.force)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote the Space to {out} ({size / 2**20:.1f} MiB)\n"
          f"push it: hf upload <user>/<space> {out} . --type space")


if __name__ == "__main__":
    main(sys.argv[1:])
