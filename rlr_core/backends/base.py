"""The backend interface: what the sampler, the estimators and the app need from a model.

A backend owns a denoiser (the module fine-tuning changes), a text encoder, a scheduler, and
the map from the denoiser's state space to images. Nothing here assumes pixel space or 2-D
images: ``state_shape`` may be (C, H, W) for images or (C, F, H, W) for video, and ``decode``
is the identity for pixel models and a VAE decode for latent ones.
"""

from __future__ import annotations

import abc

import torch
from diffusers import DDIMScheduler


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

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype (fp16/bf16 models run under autocast on CUDA)."""
        return next(self.denoiser.parameters()).dtype

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the decoded images."""
        return tuple(self.state_shape[-2:])  # type: ignore[return-value]

    def check_prompt(self, prompt: str) -> str:
        """Validate a prompt; raise ``text.PromptError`` with a message for the user."""
        return prompt

    def describe_prompt(self, prompt: str) -> str:
        """A short live note on a prompt for the UI (markdown): fine, or what is wrong."""
        try:
            return f"✓ the model reads: *{self.check_prompt(prompt)}*"
        except ValueError as err:
            return f"⚠️ {err}"

    def split_prompt(self, prompt: str) -> tuple[str, str, str]:
        """Coarse, mid and fine stage prompts for the prompt lab (DCoT). Without rules for the
        model's language, every stage starts as the prompt itself, for the person to edit."""
        canonical = self.check_prompt(prompt)
        return canonical, canonical, canonical

    # Prompts a round does not train on, for the fidelity guard's probes (each backend its own words).
    held_out_prompts: tuple[str, ...] = (
        "a red apple on a wooden table", "a blue car parked on a street", "two cats sitting on a sofa",
        "a lighthouse on a cliff at sunset", "a bowl of green soup", "a yellow umbrella in the rain",
    )

    def fidelity_judge(self, reward_encoder: str | None = None):
        """How well images follow their prompts (:mod:`rlr_core.fidelity`), or None when this model
        has no judge. ``reward_encoder``: the reward proxy's encoder spec; a model judged by CLIP
        uses the CLIP it names (``clip:<id or folder>``)."""
        return None

    def prepare_for_training(self) -> None:
        """Memory savings for a training copy (e.g. gradient checkpointing); default: none."""
        return None

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning for each prompt; the empty prompt gives the unconditional one."""

    def unconditional(self, batch: int) -> torch.Tensor:
        return self.encode_prompts([""] * batch)

    def model_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction (in the scheduler's ``prediction_type``) at timestep t."""
        return self.denoiser(x, t, encoder_hidden_states=cond).sample

    def guided_model_outputs(self, x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor,
                             cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional and conditional outputs for classifier-free guidance, in one batched call."""
        tt = t.repeat(2) if t.ndim == 1 else t
        return self.model_output(torch.cat([x, x]), tt, torch.cat([uncond, cond])).chunk(2)

    @abc.abstractmethod
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Map final states to images in [0, 1] (B, 3, H, W), or (B, F, 3, H, W) for video.

        Differentiable: the estimators backpropagate the reward through it."""

    def initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((batch, *self.state_shape), generator=generator).to(self.device)
