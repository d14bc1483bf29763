"""The service layer: every action of the app, validated, in one place the UI and API share.

``AppServices`` owns the backend (through the model registry), the feedback store, the app
state file and the background worker. Handlers in ``app/ui`` and endpoints in ``app/api`` are
thin wrappers around these methods, so the browser and ``gradio_client`` see the same checks
and the same messages.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from app import files, round_config, video
from app import validate as check
from app.admin_guard import AdminGuard
from app.archive import extract as extract_archive
from app.config import AppConfig
from app.errors import AppError
from app.generation import GenerationSettings, draw, store_images
from app.identity import Identity, sign_in_available
from app.models import ModelRegistry
from app.pairs import PairScorer
from app.rounds import RoundRunner
from app.safeguards import fidelity_flags, judge
from app.state import StateFile
from app.worker import Worker
from feedback_store import OUTCOMES, FeedbackStore
from rlr_core import dcot
from rlr_core.backends.base import DiffusionBackend
from rlr_core.backends.loading import load_backend
from rlr_core.feedback.encoders import auto_choice

MAX_IMAGES = 16
MAX_STEPS = 100
MAX_SEED = 2**31 - 1
BASE_VERSION_NAME = "v0 (base)"


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
                                         "<app>": Path(__file__).resolve().parent.parent})
        interrupted = self.store.mark_interrupted_rounds_failed()
        if interrupted:
            print(f"marked {interrupted} interrupted training round(s) as failed")
        self.base_backend = backend or load_backend(config.model, device=config.device, dtype=config.dtype)
        self.models = ModelRegistry(self.base_backend, self.store)
        # the Train tab's and the API's round defaults: the benchmark's pick for this model
        self.round_defaults = round_config.defaults_for(self.base_backend)
        self.worker = Worker()
        self._version_lock = threading.Lock()
        self._ensure_base_version()
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
                                  authorise=self.check_admin, active_version=lambda: self.active_version_id,
                                  check_prompt=self.base_backend.check_prompt, image_encoder=encoder,
                                  defaults=self.round_defaults, judge=self.fidelity_judge,
                                  held_out_prompts=self.base_backend.held_out_prompts)

    def close(self) -> None:
        self.worker.stop()
        self.worker.wait(timeout=30)
        self.rounds.close()
        self.store.close()
        self.images.close()
        self.downloads.close()

    # ------------------------------------------------------------------ versions
    def _ensure_base_version(self) -> int | None:
        """Make the active version valid. The base version row is created on first use, not at
        start-up, so a fresh data directory stays empty (the store imports only into an empty one)."""
        versions = self.store.model_versions()
        ids = {v["id"] for v in versions}
        active = self.state.get().active_version_id
        if active in ids:
            return active
        if not versions:
            return None
        # No (or a stale) state file: the newest version a finished round made, else a base.
        finished = {r["output_version_id"] for r in self.store.training_rounds("finished")}
        good = [v["id"] for v in versions if v["id"] in finished] or [
            v["id"] for v in versions if v["parent_id"] is None]
        self.state.update(active_version_id=max(good))
        return max(good)

    @property
    def active_version_id(self) -> int:
        with self._version_lock:
            vid = self._ensure_base_version()
            if vid is None:
                vid = self.store.add_model_version(
                    BASE_VERSION_NAME, config={"model": str(self.config.model), "kind": "base"})
                self.state.update(active_version_id=vid)
            return vid

    def version_name(self, version_id: int | None) -> str:
        if version_id is None:
            return "?"
        return self.store.get_model_version(version_id)["name"]

    def versions(self) -> list[dict[str, Any]]:
        """Every version with its human judgements (stars, win rate over its parent)."""
        active = self._ensure_base_version()
        meta = {v["id"]: v for v in self.store.model_versions()}
        stats = self.store.version_stats()
        # flagged / best-judged from the blind pairs and the fidelity guard (app/safeguards.py)
        judged = judge(stats, fidelity_flags(meta.values()))
        out = []
        for row in stats:
            v = meta[row["version_id"]]
            out.append({**row, **judged[row["version_id"]], "active": row["version_id"] == active,
                        "created_at": v["created_at"], "estimator": v["config"].get("estimator"),
                        "seed": v["config"].get("seed"), "round_id": v["config"].get("round_id"),
                        "weights_path": self.models.relative_weights_path(v["weights_path"]),
                        "metrics": v["metrics"]})
        return out

    def set_active_version(self, version_id: Any, password: Any = None) -> dict[str, Any]:
        self.check_admin(password)
        vid = check.whole(version_id, "version id", 1, 2**62)
        version = self.store.get_model_version(vid)
        self.models.backend(vid)  # load it now: a broken version fails here, not at the next generation
        self.state.update(active_version_id=vid)
        return version

    def rollback(self, password: Any = None, version_id: Any = None) -> dict[str, Any]:
        """Make the active version's parent active again, or the chosen version (e.g. the best-judged one)."""
        self.check_admin(password)
        if version_id not in (None, ""):
            return self.set_active_version(version_id, password)
        current = self.store.get_model_version(self.active_version_id)
        if current["parent_id"] is None:
            raise AppError(f"{current['name']} is the base model; there is nothing to roll back to")
        return self.set_active_version(current["parent_id"], password)

    def export_lora(self, version_id: Any) -> Path:
        """The version's folder (LoRA safetensors + adapter config + round settings) as a .zip."""
        vid = check.whole(version_id, "version id", 1, 2**62)
        version = self.store.get_model_version(vid)
        path = self.models.weights_path(vid)
        if path is None:
            raise AppError("the base model has no LoRA weights; pick a version a training round made")
        if not path.is_dir():
            raise AppError(f"the weights of version {vid} are missing on disk")
        out = self.downloads.new_folder()
        stem = "".join(c if c.isalnum() else "-" for c in version["name"]).strip("-")
        return Path(shutil.make_archive(str(out / f"{stem}-lora"), "zip", root_dir=path))

    # ------------------------------------------------------------------ admin
    def check_admin(self, password: str | None) -> None:
        """Model-changing and data-deleting actions: open locally, password-guarded when public."""
        self.admin.check(password)  # app/admin_guard.py: password or admin key, with a lockout

    # ------------------------------------------------------------------ generate & rate
    def check_prompt(self, prompt: Any) -> str:
        if not isinstance(prompt, str):
            raise AppError("the prompt must be text")
        return self.base_backend.check_prompt(check.no_controls(prompt, "prompt"))

    def check_generation(self, prompt: Any, n: Any = 4, seed: Any = 0, steps: Any = 20, guidance: Any = 3.0,
                         version_id: Any = None) -> tuple[str, int, int, GenerationSettings, int | None]:
        """Validate a generation request (the UI runs this first, so a typo costs no sampling)."""
        canonical = self.check_prompt(prompt)
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
        vid = vid if vid is not None else self.active_version_id
        backend = self.models.backend(vid)
        images = draw(backend, [canonical] * n, seed, settings)
        if preview:
            return [{"sample_id": None, "prompt": canonical, "seed": seed, "version_id": vid,
                     "version": self.version_name(vid), "preview": True,
                     "settings": {"steps": settings.steps, "guidance": settings.guidance, "eta": settings.eta,
                                  "batch_index": i, "batch_size": n}, "image": image}
                    for i, image in enumerate(images)]
        ids = store_images(self.store, images, [canonical] * n, seed, settings, vid)
        return [self.sample(i) for i in ids]

    def sample(self, sample_id: Any) -> dict[str, Any]:
        row = self.store.get_sample(check.sample_id(sample_id))
        return {"sample_id": row["id"], "prompt": row["prompt"], "seed": row["seed"],
                "version_id": row["model_version_id"], "version": self.version_name(row["model_version_id"]),
                "stage_prompts": row["stage_prompts"], "settings": row["sampler_settings"],
                "frames": row["sampler_settings"].get("frames", 1),  # > 1: a clip (an animated PNG)
                "image_file": row["image_file"]}

    @property
    def is_video(self) -> bool:
        return self.base_backend.is_video

    def my_rating(self, sample_id: int, rater: str) -> int | None:
        return self.store.star_rating(sample_id, rater)

    def rate(self, sample_id: Any, rater: Any, stars: Any) -> dict[str, Any]:
        """Record (or change) this rater's stars for a sample."""
        rater = check.rater(rater)
        sid = check.sample_id(sample_id)
        stars = check.whole(stars, "stars", 1, 5)
        rating_id = self.store.add_rating(sid, rater, stars, replace=True)
        self.rounds.maybe_auto_train()
        return {"rating_id": rating_id, "sample_id": sid, "stars": stars, "rater": rater}

    def to_rate(self, rater: Any, limit: Any = 8) -> list[dict[str, Any]]:
        """Samples this rater has not rated yet, newest model version first."""
        rows = self.store.next_samples_to_rate(check.rater(rater), check.whole(limit, "limit", 1, 64))
        return [self.sample(r["id"]) for r in rows]

    # ------------------------------------------------------------------ compare
    def _pair_scorer(self) -> PairScorer:
        return PairScorer(self.store, self.rounds.active_selection_scorer())

    def next_pair(self, rater: Any) -> dict[str, Any] | None:
        """The next two samples (same prompt) to compare; None when there is nothing to compare."""
        pair = self.store.next_pair(check.rater(rater), scorer=self._pair_scorer())
        if pair is None:
            return None
        return {"left": self.sample(pair.left_id), "right": self.sample(pair.right_id), "prompt": pair.prompt,
                "shown_at": time.time()}

    def compare(self, left_id: Any, right_id: Any, outcome: Any, rater: Any,
                response_time_s: Any = None, submission_id: str | None = None) -> dict[str, Any]:
        """Record a judgement; a resend with the same ``submission_id`` (a double click) is a no-op."""
        rater = check.rater(rater)
        left, right = check.sample_id(left_id, "left sample id"), check.sample_id(right_id, "right sample id")
        outcome = check.choice(outcome, "outcome", OUTCOMES)
        rt = None if response_time_s in (None, "") else check.real(response_time_s, "response time", 0, 86400)
        cid = self.store.add_comparison(left, right, outcome, rater, response_time_s=rt,
                                        submission_id=submission_id, replace=True)
        self.rounds.maybe_auto_train()
        return {"comparison_id": cid, **self.comparison_counts(rater)}

    def comparison_counts(self, rater: str | None) -> dict[str, int]:
        return self.store.comparison_counts(rater)

    # ------------------------------------------------------------------ prompt lab (DCoT)
    def split_prompt(self, prompt: Any) -> dict[str, str]:
        """The backend's split (rules for the built-in grammar; the prompt itself three times otherwise)."""
        return dict(zip(dcot.STAGES, self.base_backend.split_prompt(self.check_prompt(prompt))))

    def stage_settings(self) -> dict[str, Any]:
        st = self.state.get()
        return {"boundaries": list(st.boundaries), "focus_stage": st.focus_stage}

    def set_stage_settings(self, mid_start: Any, fine_start: Any, focus_stage: Any,
                           password: Any = None) -> dict[str, Any]:
        """The stage boundaries and focus stage the next rounds train with: admins only on a public app."""
        self.check_admin(password)
        bounds = dcot.check_boundaries([check.real(mid_start, "mid stage start", 0, 1),
                                        check.real(fine_start, "fine stage start", 0, 1)])
        focus = check.choice(focus_stage, "focus stage", ("all", *dcot.STAGES))
        self.state.update(boundaries=bounds, focus_stage=focus)
        return self.stage_settings()

    def save_stage_prompts(self, prompt: Any, coarse: Any, mid: Any, fine: Any, rater: Any) -> dict[str, Any]:
        """Save a prompt's stage prompts as prompt edits (one per stage); rounds then use them."""
        rater = check.rater(rater)
        original = self.check_prompt(prompt)
        stages = dcot.check_stage_prompts([check.no_controls(p, "stage prompt") for p in (coarse, mid, fine)],
                                          self.check_prompt)
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
        original = self.check_prompt(prompt)
        stages = dcot.check_stage_prompts([check.no_controls(p, "stage prompt") for p in (coarse, mid, fine)],
                                          self.check_prompt)
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
        backend = self.models.backend(self.active_version_id)
        # One batch of two rows would give the rows different noise; two runs share it.
        plain_final, plain_cap = dcot.sample_staged(backend, [[r[0]] for r in per_step], seed, guidance,
                                                    capture_steps=ends)
        staged_final, staged_cap = dcot.sample_staged(backend, [[r[1]] for r in per_step], seed, guidance,
                                                      capture_steps=ends)
        return {"plain": [plain_cap[e][0] for e in ends], "staged": [staged_cap[e][0] for e in ends],
                "stage_steps": [stage_of.count(k) for k in range(3)], "schedule": schedule,
                "prompt": original, "stages": stages}

    # ------------------------------------------------------------------ data
    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def rater_stats(self) -> list[dict[str, Any]]:
        return self.identity.public_rows(self.store.rater_stats(), ("rater_id",))

    def rater_agreement(self) -> list[dict[str, Any]]:
        return self.identity.public_rows(self.store.rater_agreement(), ("rater_a", "rater_b"))

    def export_data(self, password: Any = None) -> Path:
        """Export the store to a zip file (a folder the store can import again, zipped)."""
        self.check_admin(password)  # every rater's answers: admins only on a public app
        out = self.downloads.new_folder()
        folder = self.store.export_folder(out / "export")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        archive = shutil.make_archive(str(out / f"rlr-feedback-{stamp}"), "zip", root_dir=folder)
        shutil.rmtree(folder)
        return Path(archive)

    def import_data(self, archive: Any, password: Any = None) -> dict[str, int]:
        self.check_admin(password)
        if not archive:
            raise AppError("choose an export (.zip) to import")
        path = Path(str(archive))
        if files.inside(path, self.data_dir):  # never open the data folder's own files (SQLite locks)
            raise AppError("the file to import must be an uploaded .zip made by this app's export")
        if not path.is_file() or not zipfile.is_zipfile(path):
            raise AppError("the file to import must be a .zip made by this app's export")
        with tempfile.TemporaryDirectory(prefix="rlr-import-") as tmp:
            with zipfile.ZipFile(path) as zf:
                extract_archive(zf, Path(tmp))  # size, entry count and names checked first
            return self.store.import_folder(tmp)

    # ------------------------------------------------------------------ misc
    def describe_prompt(self, prompt: str) -> str:
        """A live note under the prompt box: fine, or what the model cannot read (the backend's words)."""
        if not isinstance(prompt, str) or not prompt.strip():
            return ""
        return self.base_backend.describe_prompt(prompt)

    def device_summary(self) -> str:
        b = self.base_backend
        h, w = b.image_size
        dtype = str(b.dtype).removeprefix("torch.")
        size = f"{b.frames} frames of {w}x{h}" if b.is_video else f"{w}x{h}"
        return f"{b.name} on {b.device}, {dtype}, {size} ({torch.get_num_threads()} torch thread(s))"
