"""Encoders for the reward proxy on real images (any diffusers text-to-image model).

    encoder = make_image_encoder("auto", backend, device="cuda")

Image encoders (the :class:`~rlr_core.feedback.protocols.ImageEncoder` protocol: images in
[0, 1], (B, 3, H, W) -> (B, dim), differentiable in the pixels):

- ``"perception"``: the built-in ShapesWorld perception model (32x32 shapes only); for a video
  backend (``is_video``) the clip perception model, as ``"clip-perception"`` does.
- ``"clip-perception"``: the built-in clip perception model (ShapesWorld clips (B, F, 3, H, W):
  the frames' pooled image embedding plus a motion embedding).
- ``"clip:<hub id or folder>"``: CLIP image features (``CLIPImageEncoder``). Resizing, cropping
  and normalisation are done in torch, so dR/dpixels exists (CLIPImageProcessor works in PIL and
  numpy and cuts the graph). A hub id is read from the local Hugging Face cache, else downloaded
  when the hub answers (:func:`clip_folder`).
- ``"vae"``: the fallback when no CLIP is available offline (``VAELatentEncoder``): pooled
  statistics of the diffusion model's own VAE latents. They describe colour, brightness, layout
  and texture, not meaning: a proxy on them learns "brighter", "more red on the left", "busier",
  but not "a cat". Prefer CLIP when you can fetch one. ``"vae:size=<pixels>,grid=<cells>"`` sets
  its options (either may be left out; plain ``"vae"`` is ``size=256,grid=4``).
- ``"auto"``: perception for the built-in model (clip perception for the built-in clip model);
  else the first known CLIP found in the local cache (:data:`KNOWN_CLIPS`); else vae.

- ``"per-frame:<spec>"``: an image encoder on every frame of a clip (CLIP on AnimateDiff);
  ``make_image_encoder(spec, backend, for_clips=True)`` picks it for a video model whose
  encoder reads images.

Each encoder has a ``spec`` (the string that rebuilds it) which the proxy's saved file records
next to the encoder's name and weight fingerprint; ``reward_proxy.load_proxy`` rebuilds it from
there. Prompt encoders live in :mod:`rlr_core.feedback.prompt_encoders`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from rlr_core.backends.base import DiffusionBackend
from rlr_core.backends.load_errors import HUB_ID
from rlr_core.feedback.protocols import FrozenModelEncoder, ImageEncoder
from rlr_core.shapesworld import perception

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Tried in this order by "auto" (local cache only); ViT-L/14 is the one SD 1.x's text side uses.
KNOWN_CLIPS = ("openai/clip-vit-large-patch14", "openai/clip-vit-base-patch16", "openai/clip-vit-base-patch32",
               "openai/clip-vit-large-patch14-336")


class EncoderError(ValueError):
    """An encoder could not be built; the message says why and what to do."""


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _chunked(fn, images: torch.Tensor, max_batch: int) -> torch.Tensor:
    # Bounds activation memory when embedding a store's worth of images under no_grad.
    if len(images) <= max_batch:
        return fn(images)
    return torch.cat([fn(images[i:i + max_batch]) for i in range(0, len(images), max_batch)])


# ----------------------------------------------------------------------------- image encoders
class PerceptionImageEncoder(FrozenModelEncoder):
    """The built-in ShapesWorld perception model's embedding as an ``ImageEncoder``."""

    name = "shapesworld-perception"
    spec = "perception"  # what rlr_core.feedback.encoders.make_image_encoder rebuilds it from

    def __init__(self, model: perception.PerceptionNet | None = None):
        self.model = model if model is not None else perception.load()
        self.model.eval().requires_grad_(False)
        self.dim = perception.EMBED_DIM

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (32, 32):  # e.g. a larger generated image
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.model.embed(images)


def clip_folder(source: str) -> str:
    """A local folder for ``clip:<source>``: the folder itself, or a hub id's snapshot from the
    local cache, else downloaded (configs, tokenizer files and safetensors weights only) unless
    ``HF_HUB_OFFLINE`` is set."""
    if Path(source).exists() or not HUB_ID.match(source):
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=True)
    except Exception:
        pass  # not cached: ask the hub unless told to stay offline
    fetch = f"fetch it once with `hf download {source}`, pass a folder, or use --reward-encoder vae (no download)"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        raise EncoderError(f"CLIP model {source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                           + fetch)
    try:
        return snapshot_download(source, allow_patterns=["*.json", "*.txt", "model.safetensors"])
    except Exception as err:
        raise EncoderError(f"CLIP model {source!r} is not in the local Hugging Face cache and the hub did not "
                           f"answer ({type(err).__name__}); {fetch}") from None


class CLIPImageEncoder(FrozenModelEncoder):
    """CLIP's projected image embedding (L2-normalised), differentiable in the pixels.

    Pixels go through CLIP's own preprocessing in torch: resize the short side to the model's
    image size (bicubic, antialiased), centre-crop, normalise with CLIP's mean and std."""

    name = "clip-image"

    def __init__(self, model: nn.Module, spec: str, max_batch: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.size = int(model.config.image_size)
        self.dim = int(model.config.projection_dim)
        self.max_batch = max_batch

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> CLIPImageEncoder:
        """``source``: a folder holding a CLIPModel or CLIPVisionModelWithProjection (safetensors),
        or a hub id (:func:`clip_folder`: the local cache, else downloaded when the hub answers)."""
        from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
        from transformers.utils import logging

        folder = clip_folder(source)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise EncoderError(f"CLIP model {source!r} could not be read: {err}") from err
        if config.model_type == "clip":  # a full CLIPModel: keep the vision tower and its projection
            vision = config.vision_config
            vision.projection_dim = config.projection_dim  # not carried over by the sub-config
            config = vision
        if not isinstance(config, CLIPVisionConfig):
            raise EncoderError(f"{source!r} holds a {config.model_type!r} model, not CLIP "
                               "(expected a CLIPModel or CLIPVisionModelWithProjection)")
        previous = logging.get_verbosity()
        logging.set_verbosity_error()  # a full CLIPModel's text weights are expected leftovers
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(
                folder, config=config, local_files_only=True, use_safetensors=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as err:
            raise EncoderError(f"CLIP weights in {source!r} could not be loaded (safetensors "
                               f"required): {err}") from err
        finally:
            logging.set_verbosity(previous)
        return cls(model.to(device), spec=f"clip:{source}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        if (h, w) != (self.size, self.size):
            new = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
            images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
            top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            images = images[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _module_device_dtype(self.model)
        pixels = self.preprocess(images.to(device=device, dtype=torch.float32)).to(dtype)
        emb = self.model(pixel_values=pixels).image_embeds.float()
        return F.normalize(emb, dim=-1).to(images.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return _chunked(self._embed, images, self.max_batch)


# ----------------------------------------------------------------------------- VAE fallback
class VAELatentEncoder(FrozenModelEncoder):
    """Pooled statistics of the model's own VAE latents (the offline fallback; see the module doc).

    Per latent channel: the mean and std over the image, and a ``grid`` x ``grid`` average pool
    (coarse layout). Images are resized to ``size`` first, so any resolution gives the same
    features and encoding stays cheap. Uses the posterior mean (no sampling: deterministic)."""

    name = "vae-latent"
    SIZE, GRID = 256, 4  # the defaults, which the plain spec "vae" means

    def __init__(self, vae: nn.Module, size: int = SIZE, grid: int = GRID, max_batch: int = 8):
        if not hasattr(vae, "encode"):
            raise EncoderError("the VAE encoder needs a diffusers AutoencoderKL (an object with .encode)")
        if int(size) < 8 or int(grid) < 1:
            raise EncoderError(f"vae: size must be at least 8 and grid at least 1 (got size={size}, grid={grid})")
        self.vae = vae
        self.size, self.grid, self.max_batch = int(size), int(grid), max_batch
        self.channels = int(vae.config.latent_channels)

    @property
    def dim(self) -> int:
        return self.channels * (2 + self.grid * self.grid)

    @property
    def spec(self) -> str:
        """``vae`` for the defaults, else ``vae:size=<size>,grid=<grid>`` (:func:`parse_vae_spec`).
        ``max_batch`` only bounds memory, so it is not part of the spec."""
        if (self.size, self.grid) == (self.SIZE, self.GRID):
            return "vae"
        return f"vae:size={self.size},grid={self.grid}"

    @property
    def model(self) -> nn.Module:  # what FrozenModelEncoder moves and fingerprints
        return self.vae

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        device, dtype = _module_device_dtype(self.vae)
        x = images.to(device=device, dtype=torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        z = self.vae.encode((x * 2 - 1).to(dtype)).latent_dist.mean.float()
        z = z * float(getattr(self.vae.config, "scaling_factor", 1.0))
        feats = [z.mean((-2, -1)), z.std((-2, -1)), F.adaptive_avg_pool2d(z, self.grid).flatten(1)]
        return torch.cat(feats, 1).to(images.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return _chunked(self._embed, images, self.max_batch)



class PerFrameClipEncoder:
    """An image encoder applied to every frame of a clip (B, F, 3, H, W), for video models whose
    encoder reads images (CLIP on AnimateDiff): the mean over frames and the change from the
    first frame to the last (so the proxy sees motion, crudely). An image is a one-frame clip.
    Its spec, ``per-frame:<inner spec>``, rebuilds it (:func:`make_image_encoder`)."""

    def __init__(self, inner: ImageEncoder):
        self.inner = inner
        self.name = f"per-frame-{inner.name}"
        self.spec = f"per-frame:{inner.spec}"
        self.dim = 2 * inner.dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(1)
        b, f = x.shape[:2]
        emb = self.inner.embed(x.flatten(0, 1)).view(b, f, -1)
        return torch.cat([emb.mean(1), emb[:, -1] - emb[:, 0]], dim=1)

    def fingerprint(self) -> str:
        return f"{self.inner.fingerprint()}-frames"

    def to(self, device: str | torch.device) -> PerFrameClipEncoder:
        self.inner.to(device)
        return self


def parse_vae_spec(spec: str) -> dict[str, int]:
    """The options of a ``vae`` spec: ``"vae"`` -> ``{}`` (the defaults); ``"vae:size=256,grid=4"``
    -> ``{"size": 256, "grid": 4}`` (either option may be left out)."""
    spec = spec.strip()
    if spec == "vae":
        return {}
    if not spec.startswith("vae:"):
        raise EncoderError(f"not a vae spec: {spec!r}")
    options: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec[len("vae:"):].split(","))):
        key, eq, value = (x.strip() for x in part.partition("="))
        if not eq or key not in ("size", "grid") or key in options:
            raise EncoderError(f"bad vae option {part!r} in {spec!r}; use vae:size=<pixels>,grid=<cells>")
        try:
            options[key] = int(value)
        except ValueError:
            raise EncoderError(f"vae option {key} must be a whole number, not {value!r}") from None
    return options


# ----------------------------------------------------------------------------- choosing one
def cached_clip() -> str | None:
    """The first of :data:`KNOWN_CLIPS` whose config and safetensors weights are in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in KNOWN_CLIPS:
        files = [try_to_load_from_cache(repo, name) for name in ("config.json", "model.safetensors")]
        if all(isinstance(f, str) for f in files):
            return repo
    return None


def auto_choice(backend: DiffusionBackend | None) -> tuple[str, str]:
    """What ``--reward-encoder auto`` picks on this model, and why (one sentence, said at start-up)."""
    own = "perception" if backend is None else backend.default_reward_encoder()
    if own != "auto":
        return own, f"the built-in model's own perception features ({own})"
    repo = cached_clip()
    if repo is not None:
        return f"clip:{repo}", f"{repo} is in the local Hugging Face cache (the first of the known CLIPs found)"
    if backend.vae is not None:
        return "vae", ("no known CLIP is in the local cache, so the model's own VAE latents (colour and layout, "
                       "not meaning; prompt fidelity is not guarded): pass --reward-encoder "
                       "clip:openai/clip-vit-large-patch14 to download one")
    raise EncoderError("no image encoder fits: no known CLIP in the local cache "
                       f"({', '.join(KNOWN_CLIPS)}) and the model has no VAE; pass clip:<folder>")


def takes_clips(encoder: ImageEncoder, backend: DiffusionBackend) -> bool:
    """Whether ``encoder.embed`` maps a clip batch (1, F, 3, H, W) of ``backend``'s size to (1, dim)."""
    h, w = backend.image_size
    try:
        with torch.no_grad():
            out = encoder.embed(torch.zeros(1, backend.frames, 3, h, w))
    except Exception:
        return False
    return tuple(out.shape) == (1, encoder.dim)


def make_image_encoder(spec: str, backend: DiffusionBackend | None = None,
                       device: str | torch.device = "cpu", for_clips: bool = False) -> ImageEncoder:
    """An image encoder from a spec: "perception", "clip-perception", "clip:<id-or-path>", "vae"
    (or "vae:size=<pixels>,grid=<cells>"), "per-frame:<spec>" or "auto".

    ``for_clips``: the encoder must take ``backend``'s clips (B, F, 3, H, W) (the reward proxy on
    a video model, ``backend.is_video``). The spec's encoder is used as it is when it takes them
    (the built-in clip model's perception does); an image encoder (CLIP on AnimateDiff) is
    wrapped in :class:`PerFrameClipEncoder`; a spec that fits no encoder on this model falls back
    to the built-in perception model frame by frame. Ignored for an image model."""
    if for_clips and backend is not None and backend.is_video:
        try:
            encoder = make_image_encoder(spec, backend, device)
        except EncoderError:
            encoder = None
        if encoder is not None and takes_clips(encoder, backend):
            return encoder
        return PerFrameClipEncoder(encoder if encoder is not None else make_image_encoder("perception", None, device))
    spec = (spec or "").strip()
    if spec == "clip-perception" or (spec == "perception" and backend is not None and backend.is_video):
        from rlr_core.shapesworld.clip_perception import ClipPerceptionEncoder, load

        return ClipPerceptionEncoder(load(device=device))
    if spec == "auto":
        return make_image_encoder(auto_choice(backend)[0], backend, device)
    if spec == "perception":
        enc = PerceptionImageEncoder()
        enc.model.to(device)
        enc.spec = "perception"
        return enc
    if spec.startswith("per-frame:"):
        return PerFrameClipEncoder(make_image_encoder(spec[len("per-frame:"):], backend, device))
    if spec.startswith("clip:"):
        source = spec[len("clip:"):].strip()
        if not source:
            raise EncoderError("clip: needs a hub id or a folder, e.g. clip:openai/clip-vit-large-patch14")
        return CLIPImageEncoder.from_pretrained(source, device=device)
    if spec == "vae" or spec.startswith("vae:"):
        options = parse_vae_spec(spec)
        vae = None if backend is None else backend.vae
        if vae is None:
            raise EncoderError("--reward-encoder vae needs a latent model (one with a VAE); "
                               "the built-in model uses 'perception'")
        return VAELatentEncoder(vae, **options)
    raise EncoderError(f"unknown reward encoder {spec!r}; use perception, clip-perception, clip:<hub id or folder>, "
                       "vae[:size=<pixels>,grid=<cells>], per-frame:<one of those> or auto")


