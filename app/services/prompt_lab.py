"""The prompt lab (DCoT, method doc section 5): stage prompts, stage boundaries and focus, and a
preview of plain against staged prompts from the same noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app import validate as check
from app.generation import ACTIVITY
from app.models import ModelRegistry
from app.services.generation import MAX_SEED, MAX_STEPS, Prompts
from app.state import StateFile
from feedback_store import FeedbackStore
from rlr_core import dcot


class PromptLab:
    def __init__(self, store: FeedbackStore, state: StateFile, models: ModelRegistry, prompts: Prompts,
                 active_version: Callable[[], int], authorise: Callable[[Any], None]):
        self.store = store
        self.state = state
        self.models = models
        self.prompts = prompts
        self.active_version = active_version  # makes the base version on first use (Versions.ensure_base)
        self.authorise = authorise

    def split_prompt(self, prompt: Any) -> dict[str, str]:
        """The backend's split (rules for the built-in grammar; the prompt itself three times otherwise)."""
        return self.prompts.split(prompt)

    def stage_settings(self) -> dict[str, Any]:
        st = self.state.get()
        return {"boundaries": list(st.boundaries), "focus_stage": st.focus_stage}

    def set_stage_settings(self, mid_start: Any, fine_start: Any, focus_stage: Any,
                           password: Any = None) -> dict[str, Any]:
        """The stage boundaries and focus stage the next rounds train with: admins only on a public app."""
        self.authorise(password)
        bounds = dcot.check_boundaries([check.real(mid_start, "mid stage start", 0, 1),
                                        check.real(fine_start, "fine stage start", 0, 1)])
        focus = check.choice(focus_stage, "focus stage", ("all", *dcot.STAGES))
        self.state.update(boundaries=bounds, focus_stage=focus)
        return self.stage_settings()

    def save_stage_prompts(self, prompt: Any, coarse: Any, mid: Any, fine: Any, rater: Any) -> dict[str, Any]:
        """Save a prompt's stage prompts as prompt edits (one per stage); rounds then use them."""
        rater = check.rater(rater)
        original = self.prompts.check(prompt)
        stages = dcot.check_stage_prompts([check.no_controls(p, "stage prompt") for p in (coarse, mid, fine)],
                                          self.prompts.check)
        ids = [self.store.add_prompt_edit(original, p, stage=i, reason="prompt lab: DCoT stage prompt",
                                          rater_id=rater)
               for i, p in enumerate(stages.as_list())]
        if stages.fine != original:  # the fine prompt rewrote the prompt itself
            ids.append(self.store.add_prompt_edit(original, stages.fine, reason="prompt lab: edited prompt",
                                                  rater_id=rater))
        self.store.add_prompt(original)
        return {"prompt": original, "stage_prompts": dict(zip(dcot.STAGES, stages.as_list())), "edit_ids": ids}

    def check_preview(self, prompt: Any, coarse: Any, mid: Any, fine: Any, mid_start: Any, fine_start: Any,
                      seed: Any, steps: Any, guidance: Any = 3.0) -> tuple:
        original = self.prompts.check(prompt)
        stages = dcot.check_stage_prompts([check.no_controls(p, "stage prompt") for p in (coarse, mid, fine)],
                                          self.prompts.check)
        bounds = dcot.check_boundaries([check.real(mid_start, "mid stage start", 0, 1),
                                        check.real(fine_start, "fine stage start", 0, 1)])
        return (original, stages, bounds, check.whole(steps, "steps", 3, MAX_STEPS),
                check.whole(seed, "seed", 0, MAX_SEED), check.real(guidance, "guidance", 1.0, 20.0))

    def preview_stages(self, prompt: Any, coarse: Any, mid: Any, fine: Any, mid_start: Any, fine_start: Any,
                       seed: Any, steps: Any, guidance: Any = 3.0) -> dict[str, Any]:
        """Plain prompt versus stage prompts under one seed, with what each stage has decided.

        Returns image tensors (3, H, W) for rows "plain" and "staged", each at the end of the
        coarse stage, the end of the mid stage, and final."""
        original, stages, bounds, steps, seed, guidance = self.check_preview(
            prompt, coarse, mid, fine, mid_start, fine_start, seed, steps, guidance)
        stage_of = dcot.stage_of_steps(steps, bounds)
        ends = [max(i for i, s in enumerate(stage_of) if s == k) for k in range(len(dcot.STAGES))]
        schedule = dcot.step_prompts(stages, steps, bounds)
        per_step = [[original, p] for p in schedule]  # row 0 plain, row 1 staged: same noise each
        backend = self.models.backend(self.active_version())
        # One batch of two rows would give the rows different noise; two runs share it.
        with ACTIVITY.drawing():
            plain_final, plain_cap = dcot.sample_staged(backend, [[r[0]] for r in per_step], seed, guidance,
                                                        capture_steps=ends)
            staged_final, staged_cap = dcot.sample_staged(backend, [[r[1]] for r in per_step], seed, guidance,
                                                          capture_steps=ends)
        return {"plain": [plain_cap[e][0] for e in ends], "staged": [staged_cap[e][0] for e in ends],
                "stage_steps": [stage_of.count(k) for k in range(3)], "schedule": schedule,
                "prompt": original, "stages": stages}
