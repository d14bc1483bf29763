"""Encoders for the reward proxy on real images (any diffusers text-to-image model).

    encoder = make_image_encoder("auto", backend, device="cuda")

Image encoders (the :class:`~rlr_core.feedback.reward_proxy.ImageEncoder` protocol: images in
[0, 1], (B, 3, H, W) -> (B, dim), differentiable in the pixels):

- ``"perception"``: the built-in ShapesWorld perception model (32x32 shapes only); for a video
  backend (``is_video``) the clip perception model, as ``"clip-perception"`` does.
- ``"clip-perception"``: the built-in clip perception model (ShapesWorld clips (B, F, 3, H, W):
  the frames' pooled image embedding plus a motion embedding).
- ``"clip:<hub id or folder>"``: CLIP image features (``CLIPImageEncoder``). Resizing, cropping
  and normalisation are done in torch, so dR/dpixels exists (CLIPImageProcessor works in PIL and
  numpy and cuts the graph). Read from a folder or the local Hugging Face cache only: no download.
- ``"vae"``: the fallback when no CLIP is available offline (``VAELatentEncoder``): pooled
  statistics of the diffusion model's own VAE latents. They describe colour, brightness, layout
  and texture, not meaning: a proxy on them learns "brighter", "more red on the left", "busier",
  but not "a cat". Prefer CLIP when you can fetch one.
- ``"auto"``: perception for the built-in model (clip perception for the built-in clip model);
  else the first known CLIP found in the local cache (:data:`KNOWN_CLIPS`); else vae.

Prompt encoder for free text (``HashedWordsPromptEncoder``): hashed words and word bigrams,
with no fixed vocabulary (the built-in ``BagOfWordsPromptEncoder`` knows only ShapesWorld's
words and ignores the rest).

Each encoder has a ``spec`` (the string that rebuilds it) which the proxy's saved file records
next to the encoder's name and weight fingerprint; :func:`load_proxy` rebuilds it from there.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rlr_core.feedback.reward_proxy import (
    BagOfWordsPromptEncoder,
    ImageEncoder,
    PerceptionImageEncoder,
    PromptEncoder,
    RewardProxy,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Tried in this order by "auto" (local cache only); ViT-L/14 is the one SD 1.x's text side uses.
KNOWN_CLIPS = ("openai/clip-vit-large-patch14", "openai/clip-vit-base-patch16", "openai/clip-vit-base-patch32",
               "openai/clip-vit-large-patch14-336")


class EncoderError(ValueError):
    """An encoder could not be built; the message says why and what to do."""


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 (16 hex digits) of every parameter and buffer as loaded. Loading the same model in
    another dtype gives another fingerprint (its features differ slightly too)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _chunked(fn, images: torch.Tensor, max_batch: int) -> torch.Tensor:
    # Bounds activation memory when embedding a store's worth of images under no_grad.
    if len(images) <= max_batch:
        return fn(images)
    return torch.cat([fn(images[i:i + max_batch]) for i in range(0, len(images), max_batch)])


# ----------------------------------------------------------------------------- CLIP
class CLIPImageEncoder:
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
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> CLIPImageEncoder:
        """``source``: a folder holding a CLIPModel or CLIPVisionModelWithProjection (safetensors),
        or a hub id already in the local cache. Never downloads."""
        from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
        from transformers.utils import logging

        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            hint = ("" if Path(source).exists() else
                    f"; it is not in the local Hugging Face cache. Fetch it once with "
                    f"`huggingface-cli download {source}`, pass a folder, or use --reward-encoder vae "
                    "(no download)")
            raise EncoderError(f"CLIP model {source!r} could not be read: {err}{hint}") from err
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
                source, config=config, local_files_only=True, use_safetensors=True, dtype=dtype)
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

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint


# ----------------------------------------------------------------------------- VAE fallback
class VAELatentEncoder:
    """Pooled statistics of the model's own VAE latents (the offline fallback; see the module doc).

    Per latent channel: the mean and std over the image, and a ``grid`` x ``grid`` average pool
    (coarse layout). Images are resized to ``size`` first, so any resolution gives the same
    features and encoding stays cheap. Uses the posterior mean (no sampling: deterministic)."""

    name = "vae-latent"

    def __init__(self, vae: nn.Module, size: int = 256, grid: int = 4, max_batch: int = 8, spec: str = "vae"):
        if not hasattr(vae, "encode"):
            raise EncoderError("the VAE encoder needs a diffusers AutoencoderKL (an object with .encode)")
        self.vae = vae
        self.size, self.grid, self.max_batch, self.spec = size, grid, max_batch, spec
        channels = int(vae.config.latent_channels)
        self.dim = channels * (2 + grid * grid)
        self._fingerprint: str | None = None

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

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.vae)
        return self._fingerprint


# ----------------------------------------------------------------------------- free-text prompts
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def free_text_words(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


class HashedWordsPromptEncoder:
    """Any prompt -> word indicators hashed into ``word_buckets`` plus word-bigram indicators in
    ``bigram_buckets`` ("red car" differs from "car red"). No vocabulary: unseen words still
    count (and may share a bucket with another word; more buckets make that rarer)."""

    kind = "hashed-words"

    def __init__(self, word_buckets: int = 256, bigram_buckets: int = 64):
        if word_buckets < 1 or bigram_buckets < 0:
            raise ValueError("word_buckets must be >= 1 and bigram_buckets >= 0")
        self.word_buckets, self.bigram_buckets = word_buckets, bigram_buckets
        self.dim = word_buckets + bigram_buckets

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.dim)
        for i, prompt in enumerate(prompts):
            words = free_text_words(prompt)
            for w in words:
                out[i, zlib.crc32(w.encode()) % self.word_buckets] = 1.0
            if self.bigram_buckets:
                for a, b in zip(words, words[1:]):
                    out[i, self.word_buckets + zlib.crc32(f"{a} {b}".encode()) % self.bigram_buckets] = 1.0
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "word_buckets": self.word_buckets, "bigram_buckets": self.bigram_buckets}


def default_prompt_encoder(prompts: Iterable[str]) -> PromptEncoder:
    """The ShapesWorld bag of words when every word of every prompt is in its vocabulary (the
    built-in model's prompts), else the free-text encoder."""
    bow = BagOfWordsPromptEncoder()
    known = set(bow.vocabulary)
    for prompt in prompts:
        if any(w not in known for w in bow._split(prompt) if w.isalnum()):
            return HashedWordsPromptEncoder()
    return bow


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


def _is_builtin(backend: Any) -> bool:
    from rlr_core.backends.builtin import BuiltinBackend

    return isinstance(backend, BuiltinBackend)


def _is_builtin_clips(backend: Any) -> bool:
    from rlr_core.backends.builtin_clips import BuiltinClipBackend

    return isinstance(backend, BuiltinClipBackend)


def make_image_encoder(spec: str, backend: Any = None, device: str | torch.device = "cpu") -> ImageEncoder:
    """An image encoder from a spec: "perception", "clip-perception", "clip:<id-or-path>", "vae"
    or "auto"."""
    spec = (spec or "").strip()
    if spec == "clip-perception" or (spec == "perception" and getattr(backend, "is_video", False)):
        from rlr_core.shapesworld.clip_perception import ClipPerceptionEncoder, load

        return ClipPerceptionEncoder(load(device=device))
    if spec == "auto":
        if backend is None or _is_builtin(backend) or _is_builtin_clips(backend):
            return make_image_encoder("perception", backend, device)
        repo = cached_clip()
        if repo is not None:
            return make_image_encoder(f"clip:{repo}", backend, device)
        if getattr(backend, "vae", None) is not None:
            return make_image_encoder("vae", backend, device)
        raise EncoderError("no image encoder fits: no known CLIP in the local cache "
                           f"({', '.join(KNOWN_CLIPS)}) and the model has no VAE; pass clip:<folder>")
    if spec == "perception":
        enc = PerceptionImageEncoder()
        enc.model.to(device)
        enc.spec = "perception"
        return enc
    if spec.startswith("clip:"):
        source = spec[len("clip:"):].strip()
        if not source:
            raise EncoderError("clip: needs a hub id or a folder, e.g. clip:openai/clip-vit-large-patch14")
        return CLIPImageEncoder.from_pretrained(source, device=device)
    if spec == "vae":
        vae = getattr(backend, "vae", None)
        if vae is None:
            raise EncoderError("--reward-encoder vae needs a latent model (one with a VAE); "
                               "the built-in model uses 'perception'")
        return VAELatentEncoder(vae)
    raise EncoderError(f"unknown reward encoder {spec!r}; use perception, clip-perception, clip:<hub id or folder>, "
                       "vae or auto")


def saved_encoder_spec(folder: str | Path) -> str:
    """The spec of the image encoder a saved proxy was trained with ("perception" for files
    written before specs were recorded: only the perception encoder existed then)."""
    meta = json.loads((Path(folder) / "reward_proxy.json").read_text())
    return meta["image_encoder"].get("spec") or "perception"


def load_proxy(folder: str | Path, backend: Any = None, device: str | torch.device = "cpu",
               image_encoder: ImageEncoder | None = None) -> RewardProxy:
    """Load a saved proxy with the encoder it was trained with (rebuilt from its recorded spec
    unless given); refuses, like :meth:`RewardProxy.load`, when name, size or weights differ."""
    encoder = image_encoder or make_image_encoder(saved_encoder_spec(folder), backend, device)
    return RewardProxy.load(folder, image_encoder=encoder)
