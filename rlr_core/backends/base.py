"""The backend interface: what the sampler, the estimators and the app need from a model.

A backend owns a denoiser (the module fine-tuning changes), a text encoder, a scheduler, and
the map from the denoiser's state space to images. Nothing here assumes pixel space or 2-D
images: ``state_shape`` may be (C, H, W) for images or (C, F, H, W) for video, and ``decode``
is the identity for pixel models and a VAE decode for latent ones.
"""

from __future__ import annotations

import abc
from typing import Self

import torch
from diffusers import DDIMScheduler

# Prompts for a model without rules of its own (the UI's examples on free-text models).
# Short enough for any CLIP tokenizer's 75 tokens.
FREE_TEXT_EXAMPLES = ("a lighthouse on a cliff at sunset, oil painting",
                      "a watercolor painting of a red fox in the snow",
                      "a cozy reading nook with a window, warm light", "a bowl of ramen, studio photo")


class PromptError(ValueError):
    """A prompt this model cannot take; the message is meant for the person who typed it."""


class DiffusionBackend(abc.ABC):
    """A text-conditioned diffusion model seen through the operations RLR needs.

    Besides the operations, a backend says what the layers above need to know about it, so
    they never ask for its concrete class: ``family`` (the row of the per-family round
    defaults), ``is_video`` and ``frames``, ``vae`` (latent models), ``prompt_rules`` and
    ``example_prompts`` (what the UI offers), ``default_reward_encoder``, ``fidelity_judge``
    and ``to(device)``."""

    name: str
    scheduler: DDIMScheduler
    family: str = "custom"  # the key of rlr_core/training/defaults.py's round defaults table
    is_video: bool = False  # samples are clips (B, F, 3, H, W) after decoding
    vae: torch.nn.Module | None = None  # latent models' autoencoder (the "vae" reward encoder uses it)
    # Whether prompts follow the model's own grammar (the built-in models): the UI then checks
    # them word by word and splits them into stage prompts by rules, not by hand.
    prompt_rules: bool = False
    cpu_sized: bool = False  # small enough to draw and train on a CPU (the built-in models)
    example_prompts: tuple[str, ...] = FREE_TEXT_EXAMPLES

    @property
    def frames(self) -> int:
        """Frames per sample: 1 for images."""
        return 1

    def modules(self) -> list[torch.nn.Module]:
        """Every torch module the backend holds (what ``to`` moves)."""
        return [self.denoiser]

    def to(self, device: str | torch.device) -> Self:
        """Move the whole model (and anything cached from it) to ``device``, in place."""
        for module in self.modules():
            module.to(device)
        self.clear_caches()
        return self

    def clear_caches(self) -> None:
        """Forget tensors cached from the model (after a move or a weight change)."""
        return None

    def default_reward_encoder(self) -> str:
        """The reward proxy's image encoder spec when the person names none: "auto" here means a
        known CLIP from the local cache, else the model's VAE (``rlr_core.feedback.encoders``)."""
        return "auto"

    @property
    @abc.abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts noise (or v); LoRA adapters attach here."""

    @property
    @abc.abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the diffusion state x_k, without the batch dimension."""

    # The key prefix of the exported LoRA file: "unet" (UNet models) or "transformer" (flow
    # transformers, written by StableDiffusion3Pipeline.save_lora_weights).
    lora_prefix: str = "unet"
    # The diffusers pipeline class whose ``save_lora_weights`` writes a "transformer" export
    # (StableDiffusion3Pipeline, FluxPipeline); "unet" exports use StableDiffusionPipeline's.
    lora_pipeline: str = "StableDiffusionPipeline"

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
        """Validate a prompt; raise :class:`PromptError` with a message for the user."""
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

    # Prompts whose images a round should leave as they are (prior preservation, the round setting
    # ``anchor_kl``): none here; a model whose grammar can name every attribute lists some.
    anchor_prompts: tuple[str, ...] = ()

    def fidelity_judge(self, reward_encoder: str | None = None):
        """How well images follow their prompts (:mod:`rlr_core.fidelity`), or None when this model
        has no judge. ``reward_encoder``: the reward proxy's encoder spec; a model judged by CLIP
        uses the CLIP it names (``clip:<id or folder>``)."""
        return None

    def prepare_for_training(self) -> None:
        """Memory savings for a training copy (e.g. gradient checkpointing); default: none."""
        return None

    # The guidance scale is an input of the denoiser, not classifier-free guidance (FLUX.1-dev's
    # embedded guidance; FLUX.1-schnell ignores it): the sampler then calls
    # ``model_output(x, t, cond, guidance=g)`` and never encodes the unconditional prompt.
    guidance_in_model: bool = False

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

    def step_schedule(self, steps: int, eta: float, training: bool = False):
        """The sampler's step table for ``steps`` steps at noise scale ``eta``, or None for the DDIM
        table of ``scheduler`` (:func:`rlr_core.sampler.schedule_for` asks). Flow models give their
        own (:class:`rlr_core.flow.FlowSchedule`). ``training``: the table the estimators' chain
        runs on, which must be stochastic where the model's usual sampler is not (flow models
        generate with the ODE and train on the SDE)."""
        return None

    def initial_noise(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((batch, *self.state_shape), generator=generator).to(self.device)
