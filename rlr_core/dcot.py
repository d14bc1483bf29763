"""Diffusive Chain-of-Thought (method doc, section 5) for the built-in model.

Diffusion draws coarse to fine, so DCoT conditions each third of the chain on its own prompt:
``coarse`` (layout: background, where the shape is and how big), ``mid`` (plus what shape it
is) and ``fine`` (the full prompt: colour and every other detail). The paper asked an LLM to
split a prompt; the built-in model's grammar is small enough for a rule-based splitter.

Stage prompts are cumulative on purpose: a later stage keeps the earlier stages' words, so a
stage never *un*-specifies what an earlier one fixed (a mid prompt without the background
would pull the background back toward the average one).

Step numbering: sampler step ``i = 0 .. K-1`` runs from pure noise to the image; the method
doc counts the same steps as ``k = K .. 1`` (``k = K - i``). ``stage_window`` answers in the
doc's ``k`` numbering, because that is what the HO block window ``[a, b]`` is written in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlr_core.backends.base import DiffusionBackend
from rlr_core.sampler import SamplerSettings, sample_prompts
from rlr_core.shapesworld import text
from rlr_core.shapesworld import world as sw

STAGES: tuple[str, ...] = ("coarse", "mid", "fine")
# Where the mid and the fine stage begin, as fractions of the chain. Layout settles in the
# first steps of a cosine-schedule chain; the last ~third mostly sharpens edges and colour.
DEFAULT_BOUNDARIES: tuple[float, float] = (0.3, 0.6)


class StageError(ValueError):
    """Stage settings a person has to fix (bad boundaries, unknown stage name)."""


@dataclass(frozen=True)
class StagePrompts:
    coarse: str
    mid: str
    fine: str

    def as_list(self) -> list[str]:
        return [self.coarse, self.mid, self.fine]

    @classmethod
    def from_list(cls, prompts: Sequence[str]) -> StagePrompts:
        if len(prompts) != len(STAGES):
            raise StageError(f"need {len(STAGES)} stage prompts ({', '.join(STAGES)}), got {len(prompts)}")
        return cls(*prompts)


def split_prompt(prompt: str) -> StagePrompts:
    """Split a prompt into coarse / mid / fine stage prompts (raises ``text.PromptError``)."""
    canonical = text.check_prompt(prompt)
    scene = sw.parse_caption(canonical)
    layout = {"size": scene.size, "position": scene.position, "background": scene.background}
    coarse = sw.caption(sw.PartialScene(**layout))
    mid = sw.caption(sw.PartialScene(kind=scene.kind, **layout))
    return StagePrompts(coarse=coarse, mid=mid, fine=canonical)


def split_clip_prompt(prompt: str) -> StagePrompts:
    """The clip grammar's split: ``coarse`` is the layout and the motion (size, direction, speed,
    background: where the shape goes is decided as early as where it is), ``mid`` adds what
    shape it is, ``fine`` is the full prompt (colour and every detail). Raises ``text.PromptError``."""
    from rlr_core.shapesworld import clips

    canonical = text.check_prompt(prompt, video=True)
    scene = clips.parse_clip_caption(canonical)
    layout = {"size": scene.size, "direction": scene.direction, "speed": scene.speed,
              "background": scene.background}
    coarse = clips.clip_caption(clips.PartialClipScene(**layout))
    mid = clips.clip_caption(clips.PartialClipScene(kind=scene.kind, **layout))
    return StagePrompts(coarse=coarse, mid=mid, fine=canonical)


def check_stage_prompts(prompts: Sequence[str], check: Callable[[str], str] = text.check_prompt) -> StagePrompts:
    """Validate edited stage prompts; each must be a prompt the model can read (``check``: the
    backend's prompt check; the default is the built-in model's)."""
    stages = StagePrompts.from_list(list(prompts))
    checked = []
    for name, prompt in zip(STAGES, stages.as_list()):
        try:
            checked.append(check(prompt))
        except text.PromptError as err:
            raise text.PromptError(f"{name} stage prompt: {err}") from None
    return StagePrompts(*checked)


def check_boundaries(boundaries: Sequence[float]) -> tuple[float, float]:
    if len(boundaries) != 2:
        raise StageError("give two stage boundaries: where the mid stage and the fine stage start")
    lo, hi = float(boundaries[0]), float(boundaries[1])
    if not 0.0 < lo < hi < 1.0:
        raise StageError(
            f"stage boundaries must satisfy 0 < mid start < fine start < 1, got {lo:g} and {hi:g}"
        )
    return lo, hi


def stage_of_steps(num_steps: int, boundaries: Sequence[float] = DEFAULT_BOUNDARIES) -> list[int]:
    """The stage (0 coarse, 1 mid, 2 fine) of each sampler step i = 0 .. num_steps - 1.

    Every stage gets at least one step whenever ``num_steps >= 3``, so a short preview chain
    still shows all three prompts at work."""
    lo, hi = check_boundaries(boundaries)
    if num_steps < 1:
        raise StageError(f"need at least one sampling step, got {num_steps}")
    first_mid = min(max(round(lo * num_steps), 1), num_steps)
    first_fine = min(max(round(hi * num_steps), first_mid + 1), num_steps)
    if num_steps >= 3:
        first_mid = min(first_mid, num_steps - 2)
        first_fine = min(max(first_fine, first_mid + 1), num_steps - 1)
    return [0 if i < first_mid else 1 if i < first_fine else 2 for i in range(num_steps)]


def step_prompts(
    stages: StagePrompts, num_steps: int, boundaries: Sequence[float] = DEFAULT_BOUNDARIES
) -> list[str]:
    """The conditioning schedule: the prompt for each sampler step i = 0 .. num_steps - 1."""
    names = stages.as_list()
    return [names[s] for s in stage_of_steps(num_steps, boundaries)]


def stage_window(
    stage: str, num_steps: int, boundaries: Sequence[float] = DEFAULT_BOUNDARIES
) -> tuple[int, int]:
    """The stage's steps as ``(a, b)`` in the method doc's numbering (k = K .. 1, both ends
    included): the window the next round draws its HO block start j from."""
    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    index = STAGES.index(stage)
    steps = [i for i, s in enumerate(stage_of_steps(num_steps, boundaries)) if s == index]
    if not steps:
        raise StageError(f"the {stage} stage has no steps with {num_steps} sampling steps")
    return num_steps - steps[-1], num_steps - steps[0]


def sample_staged(
    backend: DiffusionBackend,
    prompts_per_step: Sequence[Sequence[str]],
    seed: int,
    guidance: float = 3.0,
    eta: float = 1.0,
    capture_steps: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """DDIM sampling where each step has its own prompt per image (the DCoT preview).

    ``prompts_per_step[i][b]`` conditions image b at step i. Returns the images (B, 3, H, W) in
    [0, 1] and, for each step in ``capture_steps``, the model's prediction of the final image
    after that step: what the chain has decided so far. Same seed, same noise: two schedules
    drawn with one seed differ only by their prompts. (The sampler's one loop runs it:
    :func:`rlr_core.sampler.sample_prompts`.)"""
    settings = SamplerSettings(steps=len(prompts_per_step), eta=eta, guidance=guidance)
    return sample_prompts(backend, prompts_per_step, settings, seed, capture_steps)
