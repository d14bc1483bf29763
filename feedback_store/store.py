"""FeedbackStore: the app's one door to prompts, samples, ratings, comparisons and models.

Thread- and process-safe (see :mod:`feedback_store.base`). The class is assembled from parts
by concern: connections and shared helpers (:mod:`.base`), ratings, comparisons and prompt
edits with their duplicate rules (:mod:`.judgements`), training rounds (:mod:`.rounds`); this
module holds prompts, samples, model versions, the UI's queries and integrity/export/import.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from sqlite_utils import Database

from feedback_store import clips, queries
from feedback_store import validation as v
from feedback_store.base import DB_NAME, TABLES, StoreBase, decode_row
from feedback_store.errors import NotFoundError
from feedback_store.images import encode_png, to_pil
from feedback_store.judgements import JudgementsMixin
from feedback_store.queries import PairCandidate, PreferenceRecords
from feedback_store.rounds import TrainingRoundsMixin

__all__ = ["DB_NAME", "TABLES", "FeedbackStore", "StoreBase", "decode_row"]


class FeedbackStore(JudgementsMixin, TrainingRoundsMixin):
    """``FeedbackStore(data_dir)``: ``data_dir/feedback.db`` plus ``data_dir/images/``."""

    # ----------------------------------------------------------------- lookups
    def get_sample(self, sample_id: int) -> dict[str, Any]:
        """A sample with its prompt text, decoded settings and absolute image path."""
        v.identifier(sample_id, "sample id")
        rows = list(self.db.query(
            "SELECT s.*, p.text AS prompt FROM samples s JOIN prompts p ON p.id = s.prompt_id "
            "WHERE s.id = ?", [sample_id]))
        if not rows:
            raise NotFoundError(f"there is no sample with id {sample_id!r}")
        row = decode_row(rows[0])
        row["image_file"] = str(self.images.path(row["image_path"]))
        return row

    def image_path(self, sample_id: int) -> Path:
        return Path(self.get_sample(sample_id)["image_file"])

    def load_image(self, sample_id: int) -> Image.Image:
        with Image.open(self.image_path(sample_id)) as im:
            return im.convert("RGB")

    def get_model_version(self, version_id: int) -> dict[str, Any]:
        return decode_row(self._require(self.db, "model_versions", v.identifier(version_id, "version id"),
                                        "model version"))

    def model_versions(self) -> list[dict[str, Any]]:
        return [decode_row(r) for r in self.db["model_versions"].rows_where(order_by="id")]

    def counts(self) -> dict[str, int]:
        return {t: self.db[t].count for t in TABLES}

    # ----------------------------------------------------------------- raters, prompts, versions
    def add_rater(self, rater_id: str, kind: str = "person", name: str | None = None) -> str:
        """Register a rater (a person, an anonymous session, or a simulated one). Idempotent."""
        v.rater(rater_id)
        if kind not in ("person", "session", "simulated"):
            raise v.ValidationError(f"rater kind must be person, session or simulated; got {kind!r}")
        self._write(lambda db: self._ensure_rater(db, rater_id, kind, v.optional_text(name, "rater name")))
        return rater_id

    def add_prompt(self, text: str) -> int:
        """The id of ``text`` in the prompts table, adding it if new."""
        v.text(text, "prompt")
        return self._write(lambda db: self._prompt_id(db, text))

    def add_model_version(self, name: str, parent_id: int | None = None, weights_path: str | None = None,
                          config: dict | None = None, metrics: dict | None = None) -> int:
        row = {"name": v.text(name, "model version name", 200),
               "parent_id": None if parent_id is None else v.identifier(parent_id, "parent version id"),
               "weights_path": None if weights_path is None else str(weights_path),
               "config": v.json_object(config, "model config"),
               "metrics": v.json_object(metrics, "model metrics"), "created_at": v.now()}

        def tx(db: Database) -> int:
            if parent_id is not None:
                self._require(db, "model_versions", parent_id, "model version (parent)")
            return db["model_versions"].insert(row).last_pk

        return self._write(tx)

    def update_model_version(self, version_id: int, metrics: dict | None = None,
                             weights_path: str | None = None) -> None:
        """Merge ``metrics`` into the version's metrics and/or set its weights path."""
        v.identifier(version_id, "version id")
        v.json_object(metrics, "model metrics")

        def tx(db: Database) -> None:
            row = self._require(db, "model_versions", version_id, "model version")
            updates: dict[str, Any] = {}
            if metrics:
                updates["metrics"] = v.json_object({**json.loads(row["metrics"]), **metrics}, "metrics")
            if weights_path is not None:
                updates["weights_path"] = str(weights_path)
            if updates:
                db["model_versions"].update(version_id, updates)

        self._write(tx)

    # ----------------------------------------------------------------- samples
    def add_sample(self, image: Any, prompt: str, seed: int | None = None, settings: dict | None = None,
                   model_version_id: int | None = None, stage_prompts: Sequence[str] | None = None) -> int:
        """Store an image (PIL, HxWx3 array, or 3xHxW tensor) or a clip (FxHxWx3, Fx3xHxW, a
        list of frames: one animated PNG, see :mod:`feedback_store.clips`) and its provenance;
        return its id. The file is written (atomically) before the row, so no row ever points at
        a missing file."""
        v.text(prompt, "prompt")
        v.json_object(settings, "sampler settings")
        try:
            if clips.is_clip(image):
                frames = clips.frames_of(image)
                pil, data = frames[0], clips.encode_apng(frames)
                settings = {**(settings or {}), "frames": len(frames), "frames_sha256": clips.frames_sha256(frames)}
            else:
                pil = to_pil(image)
                data = encode_png(pil)
        except ValueError as err:
            raise v.ValidationError(f"cannot store this image: {err}") from err
        row = {"seed": v.seed(seed), "sampler_settings": v.json_object(settings, "sampler settings"),
               "stage_prompts": v.stage_prompts(stage_prompts),
               "model_version_id": None if model_version_id is None
               else v.identifier(model_version_id, "model version id")}
        if model_version_id is not None:  # check first so a bad id does not leave a file behind
            self._require(self.db, "model_versions", model_version_id, "model version")
        digest, rel = self.images.put(data)

        def tx(db: Database) -> int:
            return db["samples"].insert({
                **row, "uid": uuid.uuid4().hex, "prompt_id": self._prompt_id(db, prompt),
                "image_sha256": digest, "image_path": rel, "width": pil.width, "height": pil.height,
                "created_at": v.now()}).last_pk

        return self._write(tx)

    # ----------------------------------------------------------------- queries for the UI
    def next_samples_to_rate(self, rater_id: str, limit: int = 8,
                             model_version_id: int | None = None) -> list[dict[str, Any]]:
        """Samples this rater has not rated: newest model version first, least-rated first."""
        ids = queries.unrated_sample_ids(self.db, v.rater(rater_id), limit, model_version_id)
        return [self.get_sample(i) for i in ids]

    def next_pair(self, rater_id: str, scorer: Callable[[list[PairCandidate]], Sequence[float]] | None = None,
                  prompt: str | None = None, rng: random.Random | None = None,
                  max_candidates: int = 2000) -> PairCandidate | None:
        """The next pair to compare (two samples of one prompt this rater has not compared), or None.

        ``scorer`` maps candidates to scores (higher = ask sooner; it owns any randomness), e.g.
        ``rlr_core.feedback.active_selection.DisagreementScorer``. Without one, pairs across model versions
        come first, then prompts the rater saw least recently, at random. Sides are shuffled."""
        rng = rng or random.Random()
        cands = queries.pair_candidates(self.db, v.rater(rater_id), self.images.root, prompt)
        if not cands:
            return None
        if len(cands) > max_candidates:
            cands = rng.sample(cands, max_candidates)
        scores = list(scorer(cands)) if scorer else queries.default_pair_scores(cands, rng)
        best = cands[max(range(len(cands)), key=scores.__getitem__)]
        return best.swapped() if rng.random() < 0.5 else best

    def star_rating(self, sample_id: int, rater_id: str) -> int | None:
        return queries.star_rating(self.db, sample_id, rater_id)

    def comparison_counts(self, rater_id: str | None = None) -> dict[str, int]:
        return queries.comparison_counts(self.db, rater_id)

    def noise_settings(self, sample_ids: Sequence[int]) -> dict[int, tuple[int | None, dict[str, Any]]]:
        return queries.noise_settings(self.db, sample_ids)

    def saved_stage_prompts(self) -> dict[str, dict[int, str]]:
        return queries.saved_stage_prompts(self.db)

    def prompts_people_used(self) -> list[str]:
        return queries.prompts_people_used(self.db)

    def edited_prompts(self) -> list[str]:
        return queries.edited_prompts(self.db)

    def version_stats(self) -> list[dict[str, Any]]:
        return queries.version_stats(self.db)

    def rater_stats(self) -> list[dict[str, Any]]:
        return queries.rater_stats(self.db)

    def rater_agreement(self, min_overlap: int = 1) -> list[dict[str, Any]]:
        return queries.rater_agreement(self.db, min_overlap)

    def preference_records(self, rater_ids: Sequence[str] | None = None) -> PreferenceRecords:
        """Comparisons (skips excluded) and star ratings, with image paths, for training a proxy."""
        return queries.preference_records(self.db, self.images.root, rater_ids)

    # ----------------------------------------------------------------- integrity, export, import
    def verify(self, check_hashes: bool = True) -> list[str]:
        """Problems found (empty = healthy): SQLite integrity, foreign keys, image files."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
        problems += [f"foreign key violation in {r[0]} row {r[1]}"
                     for r in self.db.execute("PRAGMA foreign_key_check").fetchall()]
        for row in self.db["samples"].rows_where(select="id, image_path, image_sha256"):
            if check_hashes:
                issue = self.images.check(row["image_path"], row["image_sha256"])
            else:
                issue = None if self.images.path(row["image_path"]).exists() else "missing image file"
            if issue:
                problems.append(f"sample {row['id']}: {issue}")
        return problems

    def export_folder(self, out_dir: str | Path) -> Path:
        from feedback_store.export import export_folder

        return export_folder(self, Path(out_dir))

    def import_folder(self, folder: str | Path) -> dict[str, int]:
        from feedback_store.export import import_folder

        return import_folder(self, Path(folder))
