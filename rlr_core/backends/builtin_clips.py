"""The built-in ShapesWorld clip model behind the backend interface.

A clip's diffusion state is its frames, (F, 3, 32, 32), in pixel space; ``decode`` gives
(B, F, 3, H, W) in [0, 1]. Every sampling step is still one Gaussian step over the whole clip,
so the sampler and every estimator run unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlr_core.backends.base import DiffusionBackend
from rlr_core.backends.builtin import describe_grammar_prompt, encode_grammar_prompts
from rlr_core.shapesworld import text
from rlr_core.shapesworld.video_model import DEFAULT_CLIP_MODEL_DIR, ClipModel, load_clip_model
from rlr_core.shapesworld.world import IMAGE_SIZE


class BuiltinClipBackend(DiffusionBackend):
    """The built-in clip model: 8 frames of 32x32, the image model plus motion modules."""

    name = "shapesworld-clips"
    family = "builtin-clips"
    is_video = True
    prompt_rules = True
    cpu_sized = True
    example_prompts = ("a large red circle moving fast to the right, black background",
                       "a small blue square moving slowly up, white background",
                       "a yellow triangle standing still, navy background", "a large green triangle moving left")
    held_out_prompts = (
        "a large red circle moving fast to the right, black background",
        "a small blue square moving slowly up, white background",
        "a yellow triangle standing still, navy background",
        "a large green triangle moving left", "a small purple circle moving down, gray background",
        "an orange square moving fast to the left",
    )

    def __init__(self, model: ClipModel, path: Path | None = None):
        self.model = model
        self.scheduler = model.scheduler
        self.path = path

    @classmethod
    def load(cls, path: str | Path = DEFAULT_CLIP_MODEL_DIR, device: str | torch.device = "cpu") -> BuiltinClipBackend:
        model = load_clip_model(path).to(device)
        model.denoiser.eval()
        model.text_encoder.eval()
        model.text_encoder.requires_grad_(False)
        return cls(model, Path(path))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.model.denoiser

    @property
    def lora_target_modules(self) -> list[str]:
        # The trajectory head's output layer too: a reward on motion (prefer-fast) can then
        # change the velocity a caption is read as, not only what is drawn at rest.
        extra = ["velocity_out"] if self.denoiser.trajectory_head is not None else []
        return [*super().lora_target_modules, *extra]

    @property
    def num_frames(self) -> int:
        return self.model.num_frames

    @property
    def frames(self) -> int:
        return self.num_frames

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def default_reward_encoder(self) -> str:
        return "clip-perception"

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.num_frames, 3, IMAGE_SIZE, IMAGE_SIZE)

    def check_prompt(self, prompt: str) -> str:
        return text.check_prompt(prompt, allow_empty=False, video=True)

    def describe_prompt(self, prompt: str) -> str:
        return describe_grammar_prompt(prompt, video=True)

    def split_prompt(self, prompt: str) -> tuple[str, str, str]:
        from rlr_core import dcot  # the clip grammar's rules: layout and motion, shape, colour

        return tuple(dcot.split_clip_prompt(prompt).as_list())  # type: ignore[return-value]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return encode_grammar_prompts(self.model, prompts, self.device, video=True)

    def guided_model_outputs(self, x: torch.Tensor, t: torch.Tensor, uncond: torch.Tensor,
                             cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Both halves move the way the caption asks: an unconditional half drawn at rest would
        # make guidance push the shape away from its resting place instead of along its path.
        velocity = self.denoiser.velocity(cond)
        tt = t.repeat(2) if t.ndim == 1 else t
        both = self.denoiser(torch.cat([x, x]), tt, torch.cat([uncond, cond]),
                             velocity=None if velocity is None else torch.cat([velocity, velocity])).sample
        return both.chunk(2)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return (x0.clamp(-1, 1) + 1) / 2

    def fidelity_judge(self, reward_encoder: str | None = None):
        """The shipped clip perception model: the image attributes per frame, direction and speed."""
        from rlr_core import fidelity

        return fidelity.clips_judge()
