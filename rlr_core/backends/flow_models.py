"""Flow-matching models behind the backend interface: Stable Diffusion 3 / 3.5
(``StableDiffusion3Pipeline``; its transformer is ``SD3Transformer2DModel``) and FLUX.1 dev /
schnell (``FluxPipeline``, ``FluxTransformer2DModel``: :class:`FluxBackend`, whose differences
its docstring lists).

    backend = SD3Backend.from_pretrained("./my-sd3-folder", device="cuda", dtype=torch.bfloat16)
    backend = FluxBackend.from_pretrained("./my-flux-folder", device="cuda", dtype=torch.bfloat16)

The sampler is :mod:`rlr_core.flow`: generation uses the model's usual Euler ODE (the same
seed gives the plain pipeline's image), while the estimators' chain (``training=True``) runs
Flow-GRPO's reverse SDE with the same marginals at noise level ``eta * noise_level`` (method doc
section 10). Everything else follows ``StableDiffusion3Pipeline.__call__`` (diffusers 0.42): the
prompt encoding (the pipeline's own ``encode_prompt``; the empty prompt is the unconditional
one), classifier-free guidance (uncond + g (cond - uncond), one batched call), the timestep
t * 1000, and the VAE's scaling and shift factors.

Conditioning travels as ONE tensor (B, L + 1, W), as for every backend: rows 0 .. L-1 the joint
token embeddings (CLIP-L, CLIP-G and T5, D wide), the last row the pooled CLIP embedding (P
values); both zero-padded to W = max(D, P). ``model_output`` unpacks it.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlr_core.backends.base import DiffusionBackend, PromptError
from rlr_core.backends.picklable import picklable_pipeline, register_capture
from rlr_core.flow import FlowSchedule, make_flow_schedule

PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# Flow-GRPO's noise level a (Liu et al. 2025, Sec. 4.1 and config/grpo.py: noise_level 0.7).
NOISE_LEVEL = 0.7


def _calculate_shift(seq_len: int, config) -> float:
    """The resolution-dependent shift mu of diffusers' flow pipelines (``calculate_shift``)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


class SD3Backend(DiffusionBackend):
    """A Stable Diffusion 3 / 3.5 pipeline's transformer, VAE and three text encoders (images)."""

    family = "stable-diffusion-3"
    noise_level = NOISE_LEVEL  # a of the training SDE at eta = 1
    generate_with_sde = False  # generation runs the model's usual ODE
    max_sequence_length = 256  # T5 tokens (the pipeline's default)
    lora_prefix = "transformer"  # the exported LoRA's keys, as StableDiffusion3Pipeline writes them
    lora_pipeline = "StableDiffusion3Pipeline"  # the diffusers class whose save_lora_weights writes the export
    text_encoder_names = TEXT_ENCODERS  # the pipeline's text encoders (frozen, shared between versions)

    def __init__(self, pipe, name: str = "sd3"):
        self.pipe = pipe  # for encode_prompt (the text encoders are frozen and shared between copies)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.name = name
        for frozen in self._text_encoders():
            frozen.eval()
            frozen.requires_grad_(False)
        self.vae.eval()
        self.vae.requires_grad_(False)
        self.transformer.eval()
        self.token_dim = int(self.transformer.config.joint_attention_dim)
        self.pooled_dim = int(self.transformer.config.pooled_projection_dim)

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, n, None) for n in self.text_encoder_names) if m is not None]

    @classmethod
    def from_pipeline(cls, pipe, name: str | None = None) -> SD3Backend:
        return cls(pipe, name or getattr(pipe, "name_or_path", None) or "sd3")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SD3Backend:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), dtype=dtype)
        pipe.to(device)
        return cls.from_pipeline(pipe, name=str(path))

    def __deepcopy__(self, memo: dict) -> SD3Backend:
        # Versions and training copies differ only in the transformer.
        out = copy.copy(self)
        out.transformer = copy.deepcopy(self.transformer, memo)
        out.scheduler = copy.deepcopy(self.scheduler, memo)
        return out

    def __copy__(self) -> SD3Backend:
        # A plain shallow copy (copy.copy would otherwise go through __getstate__, meant for pickling).
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def __getstate__(self) -> dict:
        # To the CPU round process: text encoders without transformers' unpicklable capture hooks,
        # and this backend's own transformer in place of the pipeline's (the base's) one.
        state = self.__dict__.copy()
        state["pipe"] = picklable_pipeline(self.pipe, self.text_encoder_names, transformer=self.transformer)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        register_capture(*self._text_encoders())

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, *self._text_encoders()]

    @property
    def lora_target_modules(self) -> list[str]:
        # Flow-GRPO's SD3 targets: the joint attention's image and text projections.
        return ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

    @property
    def state_shape(self) -> tuple[int, ...]:
        size = self.transformer.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.transformer.config.in_channels, h, w)

    @property
    def image_size(self) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, h, w = self.state_shape
        return (h * factor, w * factor)

    def check_prompt(self, prompt: str) -> str:
        prompt = prompt.strip()
        if not prompt:
            raise PromptError("the prompt is empty")
        return prompt

    def step_schedule(self, steps: int, eta: float, training: bool = False) -> FlowSchedule:
        a = float(eta) * self.noise_level if (training or self.generate_with_sde) else 0.0
        mu = None
        if self.scheduler.config.get("use_dynamic_shifting", False):
            _, h, w = self.state_shape
            p = self.transformer.config.patch_size
            mu = _calculate_shift((h // p) * (w // p), self.scheduler.config)
        return make_flow_schedule(self.scheduler, steps, a, mu=mu)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        width = max(self.token_dim, self.pooled_dim)
        embeds = F.pad(embeds.float(), (0, width - embeds.shape[-1]))
        pooled = F.pad(pooled.float(), (0, width - pooled.shape[-1]))
        return torch.cat([embeds, pooled[:, None]], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's (encoder_hidden_states, pooled_projections) from a packed conditioning."""
        return cond[:, :-1, :self.token_dim], cond[:, -1, :self.pooled_dim]

    def model_output(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(len(x)) if t.ndim == 0 else t
        embeds, pooled = self.unpack(cond)
        dtype = self.dtype
        with self._autocast():
            out = self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=embeds.to(dtype),
                                   pooled_projections=pooled.to(dtype), return_dict=False)[0]
        return out.to(x.dtype)  # the chain's state stays fp32

    def prepare_for_training(self, gradient_checkpointing: bool | None = None) -> None:
        if gradient_checkpointing is None:
            gradient_checkpointing = self.device.type == "cuda"
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        latents = x0 / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        with self._autocast():
            images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def fidelity_judge(self, reward_encoder: str | None = None):
        from rlr_core import fidelity

        source = fidelity.clip_source(reward_encoder)
        return fidelity.clip_similarity_judge(source, str(self.device)) if source else None


class FluxBackend(SD3Backend):
    """A FLUX.1 pipeline (``FluxPipeline``: dev or schnell): its ``FluxTransformer2DModel``, VAE,
    CLIP-L (pooled) and T5 (tokens). Follows ``FluxPipeline.__call__`` (diffusers 0.42):

    - the state x is the unpacked latent (C, H, W); ``model_output`` packs it into 2x2 patches
      ((H/2)(W/2) tokens of 4C values, ``FluxPipeline._pack_latents``) with their ``img_ids`` and
      unpacks the velocity. The flow step is elementwise, so it commutes with the packing, and the
      noise is drawn unpacked, as ``prepare_latents`` draws it: a seed gives the pipeline's image;
    - the timestep passed is t = sigma (the scheduler's timestep / 1000);
    - FLUX.1-dev's guidance is embedded (``guidance_embeds``): the scale goes in as a tensor and
      there is no classifier-free guidance, so one model call per step; FLUX.1-schnell takes none
      (the scale is ignored). ``guidance_in_model`` tells the sampler;
    - the sigmas linspace(1, 1/K, K) with the resolution-dependent shift mu of the image's token
      count (``calculate_shift`` with the scheduler's base/max shift and sequence lengths);
    - the conditioning: T5's token embeddings (up to 512 tokens) and CLIP's pooled output, packed
      into one tensor as for SD3 (``txt_ids`` are zeros, as the pipeline makes them).

    The native size is the VAE's ``sample_size`` (1024 for FLUX.1), else the pipeline's default
    (128 latent pixels times the VAE's scale factor)."""

    family = "flux"
    # Flow-GRPO's noise level a for FLUX.1-dev (config/grpo.py, pickscore_flux: sample.noise_level 0.9)
    noise_level = 0.9
    lora_pipeline = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    max_sequence_length = 512  # T5 tokens (FluxPipeline's default)
    guidance_in_model = True  # embedded guidance (dev) or none (schnell): never classifier-free

    def __init__(self, pipe, name: str = "flux"):
        super().__init__(pipe, name)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.vae.config.get("sample_size") or getattr(pipe, "default_sample_size", 128) * self.vae_scale_factor
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        unit = 2 * self.vae_scale_factor  # the latent is cut into 2x2 patches
        if h % unit or w % unit:
            raise ValueError(f"FLUX images must be multiples of {unit} pixels, this VAE's sample_size is {size}")
        self._latent_hw = (h // self.vae_scale_factor, w // self.vae_scale_factor)
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> FluxBackend:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(str(path), dtype=dtype)
        pipe.to(device)
        return cls.from_pipeline(pipe, name=str(path))

    @classmethod
    def from_pipeline(cls, pipe, name: str | None = None) -> FluxBackend:
        return cls(pipe, name or getattr(pipe, "name_or_path", None) or "flux")

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels // 4, *self._latent_hw)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self._latent_hw
        return (h * self.vae_scale_factor, w * self.vae_scale_factor)

    @property
    def image_seq_len(self) -> int:
        """The transformer's image tokens: (H/2)(W/2) 2x2 patches of the latent."""
        h, w = self._latent_hw
        return (h // 2) * (w // 2)

    def step_schedule(self, steps: int, eta: float, training: bool = False) -> FlowSchedule:
        a = float(eta) * self.noise_level if (training or self.generate_with_sde) else 0.0
        config = self.scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = _calculate_shift(self.image_seq_len, {"max_shift": 1.15, **dict(config)})  # FluxPipeline's default
        return make_flow_schedule(self.scheduler, steps, a, sigmas=sigmas, mu=mu)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        width = max(self.token_dim, self.pooled_dim)
        embeds = F.pad(embeds.float(), (0, width - embeds.shape[-1]))
        pooled = F.pad(pooled.float(), (0, width - pooled.shape[-1]))
        return torch.cat([embeds, pooled[:, None]], dim=1)

    def unconditional(self, batch: int) -> torch.Tensor:
        raise NotImplementedError("FLUX.1 samples without classifier-free guidance (guidance_in_model)")

    @staticmethod
    def pack_latents(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, (H/2)(W/2), 4C): ``FluxPipeline._pack_latents``."""
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, (H/2)(W/2), 4C) -> (B, C, H, W): ``FluxPipeline._unpack_latents``."""
        b, _, c4 = tokens.shape
        return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)

    def image_ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The patches' (0, row, column) position ids: ``FluxPipeline._prepare_latent_image_ids``."""
        h, w = (n // 2 for n in self._latent_hw)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(device=device, dtype=dtype)

    def model_output(self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor,
                     guidance: float | None = None) -> torch.Tensor:
        """The velocity at the scheduler's timestep ``t`` (sigma * 1000) with the guidance scale
        ``guidance`` (FLUX.1-dev; None: 3.5, the pipeline's default; ignored by schnell)."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(len(x)) if t.ndim == 0 else t
        embeds, pooled = self.unpack(cond)
        dtype = self.dtype
        g = None
        if self.guidance_embeds:
            g = torch.full([1], 3.5 if guidance is None else float(guidance), device=x.device,
                           dtype=torch.float32).expand(len(x))
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=dtype)
        with self._autocast():
            out = self.transformer(hidden_states=self.pack_latents(x.to(dtype)), timestep=t.to(dtype) / 1000,
                                   guidance=g, pooled_projections=pooled.to(dtype),
                                   encoder_hidden_states=embeds.to(dtype), txt_ids=txt_ids,
                                   img_ids=self.image_ids(x.device, dtype), return_dict=False)[0]
        return self.unpack_latents(out, *x.shape[-2:]).to(x.dtype)  # the chain's state stays fp32


def is_flow_index(meta: dict) -> bool:
    """Whether a model_index.json is a flow-matching pipeline this module serves."""
    return str(meta.get("_class_name", "")) in PIPELINE_CLASSES


def load_folder(path: Path, label: str, meta: dict, device, dtype: torch.dtype) -> SD3Backend:
    """A ``StableDiffusion3Pipeline`` or ``FluxPipeline`` folder as a backend
    (``rlr_core.backends.loading`` dispatches here)."""
    import diffusers

    from rlr_core.backends.load_errors import ModelLoadError, first_line, model_name

    flux = str(meta.get("_class_name", "")) == "FluxPipeline"
    pipeline_class, backend_class = ((diffusers.FluxPipeline, FluxBackend) if flux
                                     else (diffusers.StableDiffusion3Pipeline, SD3Backend))
    what = "FLUX.1" if flux else "Stable Diffusion 3"
    try:
        pipe = pipeline_class.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"--model {label}: the {what} pipeline in {path} did not load "
                             f"({type(err).__name__}: {first_line(err)})") from None
    try:
        pipe.to(device)
    except Exception as err:
        raise ModelLoadError(f"--model {label}: could not move the model to {device} ({first_line(err)})") from None
    return backend_class.from_pipeline(pipe, name=model_name(label, path))
