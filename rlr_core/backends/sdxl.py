"""Stable Diffusion XL behind the backend interface: two CLIP text encoders, a pooled text
embedding and "added time ids" (image size and crop) besides the token embeddings.

    backend = SDXLBackend.from_pretrained("./my-sdxl-folder", device="cuda", dtype=torch.bfloat16)

Conditioning travels as ONE tensor, as for every backend: the sampler and the estimators cat,
repeat, index and chunk it along the batch (classifier-free guidance, per-step DCoT conditioning,
``Conditioning.take``). So ``encode_prompts`` packs, per prompt,

    rows 0 .. L-1     the token embeddings (both encoders' penultimate layers, concatenated: D wide)
    the last rows     the pooled embedding of text_encoder_2 (P values), zero-padded to whole rows

into (B, L + ceil(P / D), D), and ``model_output`` unpacks it into the UNet's
``encoder_hidden_states`` and ``added_cond_kwargs={"text_embeds", "time_ids"}``. The time ids are
not packed: they depend only on the image size (original size = target size = the model's
native size, crop (0, 0): what ``StableDiffusionXLPipeline`` passes by default).

Everything follows ``StableDiffusionXLPipeline.__call__`` (diffusers 0.42) so that the same seed
gives the same image there and here: the penultimate hidden states (no clip skip), the pooled
output of the second encoder, the all-zero unconditional embedding when the pipeline's
``force_zeros_for_empty_prompt`` is set (it is for SDXL base), and the VAE's latents_mean/std
when its config has them. The UNet, the VAE and the DDIM step table are the latent backend's.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

from rlr_core.backends.latent import DiffusersLatentBackend
from rlr_core.backends.load_errors import ModelLoadError, first_line, model_name
from rlr_core.backends.picklable import register_capture, without_capture_hooks

PIPELINE_CLASS = "StableDiffusionXLPipeline"
NEEDED = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SDXLBackend(DiffusersLatentBackend):
    """A Stable Diffusion XL pipeline's UNet, VAE and two text encoders (images)."""

    family = "stable-diffusion-xl"

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: torch.nn.Module,
                 text_encoder_2: torch.nn.Module, tokenizer, tokenizer_2, scheduler, name: str = "sdxl",
                 force_zeros_for_empty_prompt: bool = True):
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"an SDXL UNet takes addition_embed_type 'text_time', this one "
                             f"{unet.config.addition_embed_type!r}")
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, name)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        text_encoder_2.eval()
        text_encoder_2.requires_grad_(False)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.pooled_dim = int(text_encoder_2.config.projection_dim)
        self.token_dim = int(text_encoder.config.hidden_size + text_encoder_2.config.hidden_size)
        if self.token_dim != unet.config.cross_attention_dim:
            raise ValueError(f"the text encoders give {self.token_dim}-d tokens, the UNet attends to "
                             f"{unet.config.cross_attention_dim}-d ones")
        self.pooled_rows = math.ceil(self.pooled_dim / self.token_dim)
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            # SDXL's VAE overflows in fp16 (its config says force_upcast; the pipeline upcasts
            # for every decode). Kept in fp32 here once: ~0.3 GB, and decode runs it in fp32.
            vae.to(torch.float32)

    @classmethod
    def from_pipeline(cls, pipe: StableDiffusionXLPipeline, name: str | None = None) -> SDXLBackend:
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                   pipe.scheduler, name or getattr(pipe, "name_or_path", None) or "sdxl",
                   force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SDXLBackend:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, add_watermarker=False,
                                                         local_files_only=True, use_safetensors=True)
        pipe.to(device)
        return cls.from_pipeline(pipe, name=str(path))

    def __deepcopy__(self, memo: dict) -> SDXLBackend:
        # As the latent backend: versions differ only in the UNet (both text encoders are shared).
        out = copy.copy(self)
        out.unet = copy.deepcopy(self.unet, memo)
        out.scheduler = copy.deepcopy(self.scheduler, memo)
        return out

    def __copy__(self) -> SDXLBackend:
        # A plain shallow copy (copy.copy would otherwise go through __getstate__, meant for pickling).
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def __getstate__(self) -> dict:
        # To the CPU round process: both CLIPs without transformers' unpicklable capture hooks
        # (rlr_core/backends/picklable.py), weights shared.
        state = self.__dict__.copy()
        for name in ("text_encoder", "text_encoder_2"):
            state[name] = without_capture_hooks(state[name])
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        register_capture(self.text_encoder, self.text_encoder_2)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder, self.text_encoder_2]

    # -------------------------------------------------------------------------------- prompts
    @property
    def max_prompt_tokens(self) -> int:
        return min(t.model_max_length for t in (self.tokenizer, self.tokenizer_2)) - 2

    def prompt_tokens(self, prompt: str) -> int:
        return max(len(t(prompt, truncation=False, verbose=False).input_ids) - 2
                   for t in (self.tokenizer, self.tokenizer_2))

    # ---------------------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, L + pooled_rows, D): token embeddings, then the pooled embedding (module docstring)."""
        tokens, pooled = [], None
        with self._autocast():
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
                out = encoder(ids, output_hidden_states=True)
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (the pipeline's rule)
                    pooled = out[0]
                tokens.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("text_encoder_2 gives no pooled (projected) embedding")
        return self.pack(torch.cat(tokens, dim=-1).float(), pooled.float())

    def pack(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens and (B, P) pooled -> one (B, L + pooled_rows, D) tensor."""
        b, _, d = tokens.shape
        rows = torch.zeros(b, self.pooled_rows * d, dtype=tokens.dtype, device=tokens.device)
        rows[:, :pooled.shape[-1]] = pooled
        return torch.cat([tokens, rows.view(b, self.pooled_rows, d)], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`pack`: (tokens (B, L, D), pooled (B, P))."""
        tokens, rows = cond[:, :-self.pooled_rows], cond[:, -self.pooled_rows:]
        return tokens, rows.flatten(1)[:, :self.pooled_dim]

    def unconditional(self, batch: int) -> torch.Tensor:
        if not self.force_zeros_for_empty_prompt:
            return self.encode_prompts([""] * batch)
        # The pipeline's default negative: zeros for the tokens and the pooled embedding alike.
        length = self.tokenizer.model_max_length + self.pooled_rows
        return torch.zeros(batch, length, self.token_dim, device=self.device)

    def time_ids(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(B, 6): original size, crop top-left (0, 0), target size; all the native image size."""
        h, w = self.image_size
        return torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).repeat(batch, 1)

    def model_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        tokens, pooled = self.unpack(cond)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x.shape[0], x.device, x.dtype)}
        with self._autocast():
            out = self.unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        return out.to(x.dtype)

    # ------------------------------------------------------------------------------ decoding
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:  # the pipeline's de-normalisation when the VAE has one
            shape = (1, -1, 1, 1)
            latents = (x0 * torch.tensor(std, device=x0.device).view(shape) / config.scaling_factor
                       + torch.tensor(mean, device=x0.device).view(shape))
        else:
            latents = x0 / config.scaling_factor
        if self.vae.dtype == torch.float32:  # an upcast (or fp32) VAE: no autocast, as the pipeline
            images = self.vae.decode(latents).sample
        else:
            with self._autocast():
                images = self.vae.decode(latents).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------- loading (--model)
def is_sdxl_index(meta: dict) -> bool:
    """A model_index.json of the SDXL family: its class says so, or a UNet with a second text
    encoder (SD3 and Flux also have text_encoder_2, but a transformer, not a UNet)."""
    return str(meta.get("_class_name", "")).startswith("StableDiffusionXL") or (
        "text_encoder_2" in meta and "unet" in meta)


def load_folder(path: Path, label: str, meta: dict, device, dtype: torch.dtype) -> SDXLBackend:
    """The backend for a StableDiffusionXLPipeline folder; every failure is one ``ModelLoadError`` line."""
    cls_name = str(meta.get("_class_name", ""))
    missing = [c for c in NEEDED if not isinstance(meta.get(c), list) or meta.get(c)[0] is None]
    if cls_name != PIPELINE_CLASS or missing:
        found = f"a {cls_name or 'diffusers'} pipeline" + (f" without {', '.join(missing)}" if missing else "")
        raise ModelLoadError(
            f"--model {label}: not a text-to-image pipeline this app can serve: found {found}; of the SDXL family "
            f"the app serves a {PIPELINE_CLASS} folder ({', '.join(NEEDED)}); refiner and img2img/inpaint "
            "pipelines are not served")
    try:
        # safetensors only: a folder's .bin weights are pickles, which can run code when loaded
        pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, add_watermarker=False,
                                                         local_files_only=True, use_safetensors=True)
    except Exception as err:
        raise ModelLoadError(f"--model {label}: the {PIPELINE_CLASS} in {path} did not load "
                             f"({type(err).__name__}: {first_line(err)})") from None
    name = model_name(label, path)
    try:
        pipe.to(device)
    except Exception as err:
        raise ModelLoadError(f"--model {name}: could not move the model to {device} ({first_line(err)})") from None
    try:
        return SDXLBackend.from_pipeline(pipe, name=name)
    except ValueError as err:
        raise ModelLoadError(f"--model {label}: {first_line(err)}") from None
