"""The service layer: every action of the app, validated, split by concern; the UI and the API share it.

``AppServices`` is the composition root: it builds the collaborators (the backend through the
model registry, the feedback store, the app state file, the background worker, the admin guard,
the identity) and gives each service only the ones it needs:

- ``model``: :class:`ModelInfo`, what the pages read about the loaded model (fixed, read-only)
- ``prompts``: the base model's prompt rules (check, note, stage split)
- ``model_versions``: :class:`Versions`: the active version, the table, switching, rollback, LoRA export
- ``generation``: :class:`Generation`: drawing samples with a version, a stored sample as shown
- ``judgements``: :class:`Judgements`: stars, blind comparisons, each rater's queue and next pair
- ``prompt_lab``: :class:`PromptLab`: DCoT stage prompts, boundaries, previews
- ``data``: :class:`Data`: counts, rater statistics, export and import
- ``rounds``: :class:`RoundRunner` (app/rounds.py): training rounds and auto-train

The tabs in ``app/tabs`` and the endpoints in ``app/api`` are thin wrappers around these
services, so the browser and ``gradio_client`` see the same checks and the same messages. Callers
name the service that owns an action (``services.generation.generate``, ``services.judgements.rate``,
``services.model_versions.table()``); ``AppServices`` itself only builds and closes them.
"""

from __future__ import annotations

from pathlib import Path

from app import files, round_config, video
from app.admin_guard import AdminGuard
from app.config import AppConfig
from app.identity import Identity, sign_in_available
from app.models import ModelRegistry
from app.rounds import RoundRunner
from app.services.data import Data
from app.services.generation import MAX_IMAGES, MAX_SEED, MAX_STEPS, Generation, Prompts
from app.services.judgements import Judgements
from app.services.model_info import ModelInfo
from app.services.prompt_lab import PromptLab
from app.services.versions import BASE_VERSION_NAME, Versions
from app.state import StateFile
from app.worker import Worker
from feedback_store import FeedbackStore
from rlr_core.backends.base import DiffusionBackend
from rlr_core.backends.loading import load_backend
from rlr_core.feedback.encoders import auto_choice

__all__ = ["BASE_VERSION_NAME", "MAX_IMAGES", "MAX_SEED", "MAX_STEPS", "AppServices", "Data", "Generation",
           "Judgements", "ModelInfo", "PromptLab", "Prompts", "Versions"]


class AppServices:
    def __init__(self, config: AppConfig, backend: DiffusionBackend | None = None):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.store = FeedbackStore(self.data_dir)
        self.state = StateFile(self.data_dir)
        self.identity = Identity(config.public, config.public and config.space and sign_in_available(),
                                 self.data_dir)
        self.admin = AdminGuard(config.needs_admin, config.admin_password, config.admins)
        self.images = files.PublicImages()  # what the UI may show: never files in the data folder
        self.downloads = files.TempFiles()
        self.scrub = files.PathScrubber({"<data>": self.data_dir,
                                         "<app>": Path(__file__).resolve().parent.parent.parent})
        interrupted = self.store.mark_interrupted_rounds_failed()
        if interrupted:
            print(f"marked {interrupted} interrupted training round(s) as failed")
        self.base_backend = backend or load_backend(config.model, device=config.device, dtype=config.dtype)
        self.model = ModelInfo.of(self.base_backend)
        self.models = ModelRegistry(self.base_backend, self.store)
        # the Train tab's and the API's round defaults: the benchmark's pick for this model
        self.round_defaults = round_config.defaults_for(self.base_backend)
        self.worker = Worker()
        self.prompts = Prompts(self.base_backend)
        # Model-changing and data-deleting actions: open locally, password-guarded when public.
        authorise = self.admin.check  # app/admin_guard.py: password or admin key, with a lockout
        self.model_versions = Versions(self.store, self.state, self.models, self.downloads, authorise,
                                       base_config={"model": str(config.model), "kind": "base"})
        # a stale state file is put right now; the base version's row waits for its first use, so a
        # fresh data directory stays empty (the store imports only into an empty one)
        self.model_versions.settle()
        if config.auto_train_every and not self.state.get().auto_train_every:
            self.state.update(auto_train_every=config.auto_train_every)
        # made at start-up, so a bad --reward-encoder fails before the page is served; clips for a video model
        spec = config.reward_encoder
        if spec.strip() == "auto" and not self.base_backend.prompt_rules:  # resolved once, and said why
            spec, why = auto_choice(self.base_backend)
            print(f"reward encoder: {spec}: {why}")
        encoder = video.reward_encoder(spec, self.base_backend, config.device)
        # prompt fidelity's judge (rlr_core/fidelity.py); None: the model has none and fidelity is not guarded
        # (a CLIP-judged model uses the CLIP the proxy uses, also when "auto" chose it)
        self.fidelity_judge = self.base_backend.fidelity_judge(encoder.spec)
        self.rounds = RoundRunner(self.store, self.worker, self.state, self.models, self.data_dir,
                                  authorise=authorise, active_version=self.model_versions.ensure_base,
                                  check_prompt=self.base_backend.check_prompt, image_encoder=encoder,
                                  defaults=self.round_defaults, judge=self.fidelity_judge,
                                  held_out_prompts=self.base_backend.held_out_prompts)
        self.generation = Generation(self.store, self.models, self.model_versions, self.prompts)
        self.judgements = Judgements(self.store, self.generation.sample, after_judgement=self.rounds.maybe_auto_train,
                                     selection_scorer=self.rounds.active_selection_scorer)
        self.prompt_lab = PromptLab(self.store, self.state, self.models, self.prompts,
                                    active_version=self.model_versions.ensure_base, authorise=authorise)
        self.data = Data(self.store, self.identity, self.downloads, self.data_dir, authorise,
                         is_video=self.model.is_video)

    def close(self) -> None:
        self.worker.stop()
        self.worker.wait(timeout=30)
        self.rounds.close()
        self.store.close()
        self.images.close()
        self.downloads.close()
