"""Which prompts a training round trains on: the ones people actually used and edited.

People's prompts are those of samples drawn from the Generate tab (most recently used first),
plus prompts rewritten in the prompt lab. A prompt whose stage prompts were saved in the
prompt lab trains with them (the latest saved edit of each stage wins).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from feedback_store import FeedbackStore
from rlr_core import dcot
from rlr_core.backends.base import PromptError
from rlr_core.shapesworld import text


@dataclass(frozen=True)
class RoundPrompt:
    prompt: str
    stages: dcot.StagePrompts | None
    source: str  # "prompt lab", "edited" or "generated"

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "stages": self.stages.as_list() if self.stages else None,
                "source": self.source}


def stage_prompts_by_prompt(store: FeedbackStore) -> dict[str, dcot.StagePrompts]:
    """prompt -> its latest saved stage prompts (only prompts with all three stages saved)."""
    out = {}
    for prompt, stages in store.saved_stage_prompts().items():
        if set(stages) >= {0, 1, 2}:
            out[prompt] = dcot.StagePrompts(stages[0], stages[1], stages[2])
    return out


def round_prompts(store: FeedbackStore, limit: int,
                  check: Callable[[str], str] = text.check_prompt) -> list[RoundPrompt]:
    """Up to ``limit`` prompts, most recently used first; edited prompts are included.
    ``check``: the served model's prompt check (default: the built-in model's)."""
    used = [(prompt, "generated") for prompt in store.prompts_people_used()]
    edited = [(prompt, "edited") for prompt in store.edited_prompts()]
    staged = stage_prompts_by_prompt(store)
    out: list[RoundPrompt] = []
    seen: set[str] = set()
    lab = [(prompt, "prompt lab") for prompt in reversed(list(staged))]  # latest saved first
    for prompt, source in [*lab, *edited, *used]:
        try:
            canonical = check(prompt)
        except PromptError:
            continue  # e.g. imported data from another model's vocabulary
        if canonical in seen:
            continue
        seen.add(canonical)
        out.append(RoundPrompt(canonical, staged.get(canonical), source))
        if len(out) >= limit:
            break
    return out
