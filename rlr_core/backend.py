"""The backend interface: what the sampler, the estimators and the app need from a model.

A backend owns a denoiser (the module fine-tuning changes), a text encoder, a scheduler, and
the map from the denoiser's state space to images. Nothing here assumes pixel space or 2-D
images: ``state_shape`` may be (C, H, W) for images or (C, F, H, W) for video, and ``decode``
is the identity for pixel models and a VAE decode for latent ones.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from rlr_core import text
from rlr_core.builtin_model import DEFAULT_MODEL_DIR, BuiltinModel, load_model
from rlr_core.shapes_world import IMAGE_SIZE


class DiffusionBackend(abc.ABC):
    """A text-conditioned diffusion model seen through the operations RLR needs."""

    name: str
    scheduler: DDIMScheduler

    @property
    @abc.abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts noise (or v); LoRA adapters attach here."""

    @property
    @abc.abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the diffusion state x_k, without the batch dimension."""

    @property
    def lora_target_modules(self) -> list[str]:
        """Names of the denoiser's linear layers a LoRA adapter should wrap."""
        return ["to_q", "to_k", "to_v", "to_out.0"]

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def check_prompt(self, prompt: str) -> str:
        """Validate a prompt; raise ``text.PromptError`` with a message for the user."""
        return prompt

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning for each prompt; the empty prompt gives the unconditional one."""

    def unconditional(self, batch: int) -> torch.Tensor:
        return self.encode_prompts([""] * batch)

    def model_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction (in the scheduler's ``prediction_type``) at timestep t."""
        return self.denoiser(x, t, encoder_hidden_states=cond).sample

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Map final states to images in [0, 1] (B, 3, H, W), or (B, F, 3, H, W) for video.

        Differentiable: the estimators backpropagate the reward through it."""

    def initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((batch, *self.state_shape), generator=generator).to(self.device)


class BuiltinBackend(DiffusionBackend):
    """The built-in pixel-space ShapesWorld model (the app's default)."""

    name = "shapesworld-tiny"

    def __init__(self, model: BuiltinModel, path: Path | None = None):
        self.model = model
        self.scheduler = model.scheduler
        self.path = path
        self._uncond_cache: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL_DIR, device: str | torch.device = "cpu") -> BuiltinBackend:
        model = load_model(path).to(device)
        model.unet.eval()
        model.text_encoder.eval()
        model.text_encoder.requires_grad_(False)
        return cls(model, Path(path))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.unet

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (3, IMAGE_SIZE, IMAGE_SIZE)

    def check_prompt(self, prompt: str) -> str:
        return text.check_prompt(prompt, allow_empty=False)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.model.tokenizer
        canonical = [text.check_prompt(p, allow_empty=True) for p in prompts]
        ids = tok(canonical, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.model.text_encoder(ids).last_hidden_state

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return (x0.clamp(-1, 1) + 1) / 2
