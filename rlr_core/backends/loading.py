"""Pick and load the backend for a ``--model`` value.

    load_backend("models/shapesworld-tiny")             the built-in model (the default)
    load_backend("models/shapesworld-clips")            the built-in clip model (a video app)
    load_backend("./my-sd-folder", "cuda", "fp16")       a diffusers pipeline folder
    load_backend("org/name", "cuda")                     a hub id (from the local cache when offline)
    load_backend("./model.safetensors", "cuda")          a single-file checkpoint (diffusers from_single_file)
    load_backend("./my-animatediff", "cuda")             an AnimateDiffPipeline folder (video; backends.animatediff)
    load_backend("./my-flux", "cuda", "bf16")            a StableDiffusion3Pipeline or FluxPipeline folder
                                                         (flow matching; backends.flow_models)

Every failure is a :class:`ModelLoadError` whose message (one line) says what was found and
what to do; ``python app.py`` prints it and exits with code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rlr_core.backends import animatediff, flow_models, sdxl
from rlr_core.backends.base import DiffusionBackend
from rlr_core.backends.load_errors import HUB_ID, ModelLoadError, first_line, model_name

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What a Stable-Diffusion-class pipeline needs (SDXL, with a second text encoder: backends.sdxl).
NEEDED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
BUILTIN_NOTE = "the built-in model (no --model) needs nothing"


def is_builtin_folder(path: Path) -> bool:
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("kind") == "shapesworld-builtin"
    except (OSError, ValueError):
        return False


def is_builtin_clip_folder(path: Path) -> bool:
    """The built-in clip model (a video app); ``video_model.is_clip_model_folder``, never raising."""
    from rlr_core.shapesworld.video_model import is_clip_model_folder

    try:
        return is_clip_model_folder(path)
    except (OSError, ValueError):
        return False


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA where the GPU has it, else fp16. fp32 on a CPU whatever was asked:
    half precision there is slow or unsupported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if torch.device(device).type != "cuda":
        if dtype not in ("auto", *DTYPES):
            raise ModelLoadError(f"--dtype {dtype}: choose auto, fp32, fp16 or bf16")
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"--dtype {dtype}: choose auto, fp32, fp16 or bf16") from None


def load_backend(model: str | Path, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "auto") -> DiffusionBackend:
    """The backend for ``model`` (see the module docstring)."""
    path = Path(model).expanduser()
    if is_builtin_folder(path):
        from rlr_core.backends.builtin import BuiltinBackend

        return BuiltinBackend.load(path, device=device)
    if is_builtin_clip_folder(path):
        from rlr_core.backends.builtin_clips import BuiltinClipBackend

        return BuiltinClipBackend.load(path, device=device)
    torch_dtype = resolve_dtype(dtype, device)
    if path.is_dir():
        return _load_folder(path, str(model), device, torch_dtype)
    if path.is_file():
        return _load_single_file(path, device, torch_dtype)
    # a path whose folder exists ("./x/typo") is a mistyped path, not a hub id org/name
    local_parent = path.parent != Path(".") and path.parent.is_dir()
    if HUB_ID.match(str(model)) and not str(model).startswith((".", "/", "~")) and not local_parent:
        return _load_folder(_hub_snapshot(str(model)), str(model), device, torch_dtype)
    raise ModelLoadError(f"--model {model}: no such folder or file, and not a hub id (org/name)")


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub repository: the cache first, the hub only when online."""
    from huggingface_hub import snapshot_download

    fetch = f"fetch it once with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download {repo_id}`)"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass  # not cached (or only partly): try the hub unless told to stay offline
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        raise ModelLoadError(f"--model {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             f"{fetch} on a machine with hub access, or pass a local folder; {BUILTIN_NOTE}")
    try:
        # The pipeline's own files only: a repository's root often also holds multi-GB single-file
        # checkpoints, and its subfolders fp16 / non-EMA variants.
        return Path(snapshot_download(repo_id, allow_patterns=["model_index.json", "*/*.json", "*/*.txt",
                                                               "*/*.safetensors", "*/*.model"],
                                      ignore_patterns=["*.fp16.*", "*non_ema*"]))
    except Exception as err:
        raise ModelLoadError(f"--model {repo_id}: not in the local Hugging Face cache and the hub did not answer "
                             f"({type(err).__name__}); {fetch}, or pass a local folder; {BUILTIN_NOTE}") from None


def describe_folder(path: Path) -> str:
    """What a folder holds, in a few words (for the 'not a pipeline' message)."""
    index = path / "model_index.json"
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
        except ValueError:
            return "a model_index.json that is not valid JSON"
        parts = sorted(k for k, v in meta.items() if not k.startswith("_") and isinstance(v, list))
        return f"a {meta.get('_class_name', 'diffusers')} pipeline with components {', '.join(parts) or 'none'}"
    config = path / "config.json"
    if config.is_file():
        try:
            cls = json.loads(config.read_text()).get("_class_name") or json.loads(config.read_text()).get(
                "architectures", ["an unknown model"])[0]
        except (ValueError, IndexError, AttributeError):
            cls = "an unreadable config.json"
        return f"a single model ({cls}), not a whole pipeline"
    names = sorted(p.name for p in path.iterdir())[:6]
    return f"no model_index.json; it holds {', '.join(names) if names else 'nothing'}"


def _load_folder(path: Path, label: str, device, dtype: torch.dtype) -> DiffusionBackend:
    index = path / "model_index.json"
    meta: dict = {}
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
        except ValueError:
            meta = {}
    if str(meta.get("_class_name", "")).startswith("AnimateDiff") or animatediff.is_motion_adapter_folder(path):
        return animatediff.load_folder(path, label, meta, device, dtype)
    if sdxl.is_sdxl_index(meta):
        return sdxl.load_folder(path, label, meta, device, dtype)
    if flow_models.is_flow_index(meta):  # Stable Diffusion 3 / 3.5, FLUX.1
        return flow_models.load_folder(path, label, meta, device, dtype)
    missing = [c for c in NEEDED if not isinstance(meta.get(c), list)]
    if not meta or missing:
        raise ModelLoadError(
            f"--model {label}: not a text-to-image pipeline this app can serve: found {describe_folder(path)}; "
            f"it needs a Stable Diffusion 1.x/2.x-class diffusers folder ({', '.join(NEEDED)}), "
            f"a Stable Diffusion XL folder ({sdxl.PIPELINE_CLASS}: also text_encoder_2, tokenizer_2), "
            "a StableDiffusion3Pipeline or FluxPipeline folder, or an AnimateDiffPipeline folder for video")
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(path), dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"--model {label}: the pipeline in {path} did not load "
                             f"({type(err).__name__}: {first_line(err)})") from None
    return _from_pipe(pipe, model_name(label, path), device)


def _load_single_file(path: Path, device, dtype: torch.dtype) -> DiffusionBackend:
    if path.suffix != ".safetensors":
        # .ckpt/.pt files are pickles, which can run code when loaded: refused.
        raise ModelLoadError(f"--model {path}: a single-file checkpoint must be .safetensors "
                             f"(found {path.suffix or 'a file without extension'}); {BUILTIN_NOTE}")
    from diffusers import StableDiffusionPipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=offline)
    except Exception as err:
        raise ModelLoadError(
            f"--model {path}: diffusers could not load this single-file checkpoint as a Stable Diffusion pipeline "
            f"({type(err).__name__}: {first_line(err)}); from_single_file also needs the base pipeline's configs "
            "from the hub or its local cache (e.g. `hf download stable-diffusion-v1-5/stable-diffusion-v1-5 "
            "--include '*.json' '*.txt'`)") from None
    return _from_pipe(pipe, path.stem, device)


def _from_pipe(pipe, name: str, device) -> DiffusionBackend:
    from rlr_core.backends.latent import DiffusersLatentBackend

    try:
        pipe.to(device)
    except Exception as err:
        raise ModelLoadError(f"--model {name}: could not move the model to {device} ({first_line(err)})") from None
    return DiffusersLatentBackend.from_pipeline(pipe, name=name)
