"""Generation: the base model's prompt rules, drawing samples with a version, and a stored sample
as the pages and the API show it."""

from __future__ import annotations

from typing import Any

from app import validate as check
from app.errors import AppError
from app.generation import GenerationSettings, draw, store_images
from app.models import ModelRegistry
from app.services.versions import Versions
from feedback_store import FeedbackStore
from rlr_core import dcot
from rlr_core.backends.base import DiffusionBackend

MAX_IMAGES = 16
MAX_STEPS = 100
MAX_SEED = 2**31 - 1


class Prompts:
    """The base model's prompt rules (its check, its note under the prompt box, its stage split)."""

    def __init__(self, backend: DiffusionBackend):
        self._backend = backend

    def check(self, prompt: Any) -> str:
        if not isinstance(prompt, str):
            raise AppError("the prompt must be text")
        return self._backend.check_prompt(check.no_controls(prompt, "prompt"))

    def describe(self, prompt: str) -> str:
        """A live note under the prompt box: fine, or what the model cannot read (the backend's words)."""
        if not isinstance(prompt, str) or not prompt.strip():
            return ""
        return self._backend.describe_prompt(prompt)

    def split(self, prompt: Any) -> dict[str, str]:
        """The backend's split (rules for the built-in grammar; the prompt itself three times otherwise)."""
        return dict(zip(dcot.STAGES, self._backend.split_prompt(self.check(prompt))))


class Generation:
    def __init__(self, store: FeedbackStore, models: ModelRegistry, versions: Versions, prompts: Prompts):
        self.store = store
        self.models = models
        self.versions = versions
        self.prompts = prompts

    def check_generation(self, prompt: Any, n: Any = 4, seed: Any = 0, steps: Any = 20, guidance: Any = 3.0,
                         version_id: Any = None) -> tuple[str, int, int, GenerationSettings, int | None]:
        """Validate a generation request (the UI runs this first, so a typo costs no sampling)."""
        canonical = self.prompts.check(prompt)
        n = check.whole(n, "number of images", 1, MAX_IMAGES)
        seed = check.whole(seed, "seed", 0, MAX_SEED)
        settings = GenerationSettings(steps=check.whole(steps, "steps", 2, MAX_STEPS),
                                      guidance=check.real(guidance, "guidance", 1.0, 20.0))
        vid = None
        if version_id not in (None, ""):
            vid = check.whole(version_id, "version (an id from /versions)", 1, 2**62)
            if vid not in {v["id"] for v in self.store.model_versions()}:
                raise AppError(f"there is no model version {vid}: pick an id from /versions")
        return canonical, n, seed, settings, vid

    def generate(self, prompt: Any, n: Any = 4, seed: Any = 0, steps: Any = 20, guidance: Any = 3.0,
                 version_id: Any = None, preview: Any = False) -> list[dict[str, Any]]:
        """Draw ``n`` images of ``prompt`` with a version (default: the active one) and store them.

        ``preview``: store nothing (no samples, so nothing joins the rating or pair queues, the
        before/after statistics or a round's prompts); each answer then has ``image`` (a tensor)
        and no ``sample_id``. For measuring a version without changing what the app learns from."""
        if not isinstance(preview, bool):
            raise AppError("preview must be true or false")
        canonical, n, seed, settings, vid = self.check_generation(prompt, n, seed, steps, guidance, version_id)
        vid = vid if vid is not None else self.versions.ensure_base()
        backend = self.models.backend(vid)
        images = draw(backend, [canonical] * n, seed, settings)
        if preview:
            return [{"sample_id": None, "prompt": canonical, "seed": seed, "version_id": vid,
                     "version": self.versions.name(vid), "preview": True,
                     "settings": {"steps": settings.steps, "guidance": settings.guidance, "eta": settings.eta,
                                  "batch_index": i, "batch_size": n}, "image": image}
                    for i, image in enumerate(images)]
        ids = store_images(self.store, images, [canonical] * n, seed, settings, vid)
        return [self.sample(i) for i in ids]

    def sample(self, sample_id: Any) -> dict[str, Any]:
        row = self.store.get_sample(check.sample_id(sample_id))
        return {"sample_id": row["id"], "prompt": row["prompt"], "seed": row["seed"],
                "version_id": row["model_version_id"], "version": self.versions.name(row["model_version_id"]),
                "stage_prompts": row["stage_prompts"], "settings": row["sampler_settings"],
                "frames": row["sampler_settings"].get("frames", 1),  # > 1: a clip (an animated PNG)
                "image_file": row["image_file"]}
