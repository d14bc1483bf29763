"""Star ratings, pairwise comparisons and prompt edits: the people's judgements.

Duplicate submissions (decided here, documented in docs/store.md):
- A rater has at most one star rating per sample and one comparison per unordered pair.
  A second one raises ``DuplicateError`` unless ``replace=True`` (a rater changing their mind).
- A client may pass ``submission_id`` (e.g. a UUID made when the widget is shown). Resending
  the same submission with the same answer returns the original row id and changes nothing
  (safe network retries and double clicks); reusing it for a different answer raises
  ``DuplicateError``.
"""

from __future__ import annotations

from sqlite_utils import Database

from feedback_store import validation as v
from feedback_store.base import StoreBase, _insert
from feedback_store.errors import DuplicateError


class JudgementsMixin(StoreBase):
    @staticmethod
    def _by_submission(db: Database, table: str, submission_id: str | None) -> dict | None:
        if submission_id is None:
            return None
        rows = list(db[table].rows_where("submission_id = ?", [submission_id], limit=1))
        return rows[0] if rows else None

    def add_rating(self, sample_id: int, rater_id: str, stars: int, submission_id: str | None = None,
                   replace: bool = False) -> int:
        """Record ``stars`` (1-5) from ``rater_id`` for a sample; return the rating's id."""
        v.identifier(sample_id, "sample id")
        v.rater(rater_id)
        v.stars(stars)
        v.optional_text(submission_id, "submission id", 200)

        def tx(db: Database) -> int:
            prior = self._by_submission(db, "ratings", submission_id)
            if prior is not None:
                if (prior["sample_id"], prior["rater_id"], prior["stars"]) == (sample_id, rater_id, stars):
                    return prior["id"]  # a resend of the same answer: nothing to do
                raise DuplicateError(f"submission {submission_id!r} was already used for a different "
                                     "rating; nothing was changed", prior["id"])
            self._require(db, "samples", sample_id, "sample")
            self._ensure_rater(db, rater_id)
            existing = list(db["ratings"].rows_where("rater_id = ? AND sample_id = ?",
                                                     [rater_id, sample_id], limit=1))
            now = v.now()
            if existing:
                old = existing[0]
                if not replace:
                    raise DuplicateError(
                        f"rater {rater_id!r} already gave sample {sample_id} {old['stars']} stars; "
                        "nothing was changed (pass replace=True to change a rating)", old["id"])
                db["ratings"].update(old["id"], {
                    "stars": stars, "updated_at": now,
                    "submission_id": old["submission_id"] if submission_id is None else submission_id})
                return old["id"]
            return _insert(db, "ratings", {"sample_id": sample_id, "rater_id": rater_id, "stars": stars,
                                           "submission_id": submission_id, "created_at": now,
                                           "updated_at": now})

        return self._write(tx)

    def add_comparison(self, left_id: int, right_id: int, outcome: str, rater_id: str,
                       response_time_s: float | None = None, submission_id: str | None = None,
                       replace: bool = False) -> int:
        """Record a pairwise judgement: outcome is left, right, tie-both-good, tie-both-bad or skip."""
        v.identifier(left_id, "left sample id")
        v.identifier(right_id, "right sample id")
        if left_id == right_id:
            raise v.ValidationError("a comparison needs two different samples")
        v.outcome(outcome)
        v.rater(rater_id)
        rt = v.response_time(response_time_s)
        v.optional_text(submission_id, "submission id", 200)
        answer = (left_id, right_id, outcome, rater_id)

        def tx(db: Database) -> int:
            prior = self._by_submission(db, "comparisons", submission_id)
            if prior is not None:
                if (prior["left_id"], prior["right_id"], prior["outcome"], prior["rater_id"]) == answer:
                    return prior["id"]
                raise DuplicateError(f"submission {submission_id!r} was already used for a different "
                                     "comparison; nothing was changed", prior["id"])
            self._require(db, "samples", left_id, "sample (left)")
            self._require(db, "samples", right_id, "sample (right)")
            self._ensure_rater(db, rater_id)
            existing = list(db["comparisons"].rows_where(
                "rater_id = ? AND min(left_id, right_id) = ? AND max(left_id, right_id) = ?",
                [rater_id, min(left_id, right_id), max(left_id, right_id)], limit=1))
            now = v.now()
            row = {"left_id": left_id, "right_id": right_id, "outcome": outcome, "rater_id": rater_id,
                   "response_time_s": rt, "submission_id": submission_id, "updated_at": now}
            if existing:
                old = existing[0]
                if not replace:
                    raise DuplicateError(
                        f"rater {rater_id!r} already compared samples {left_id} and {right_id} "
                        f"({old['outcome']}); nothing was changed (pass replace=True to change it)",
                        old["id"])
                if submission_id is None:
                    row["submission_id"] = old["submission_id"]
                db["comparisons"].update(old["id"], row)
                return old["id"]
            return _insert(db, "comparisons", {**row, "created_at": now})

        return self._write(tx)

    def add_prompt_edit(self, original: str, edited: str, stage: int | None = None,
                        reason: str | None = None, rater_id: str | None = None,
                        sample_id: int | None = None) -> int:
        """Record that a person rewrote a prompt (optionally one DCoT stage of it), and why."""
        row = {"original": v.text(original, "original prompt"), "edited": v.text(edited, "edited prompt"),
               "stage": None if stage is None else v.identifier(stage, "stage"),
               "reason": v.optional_text(reason, "reason"),
               "rater_id": None if rater_id is None else v.rater(rater_id),
               "sample_id": None if sample_id is None else v.identifier(sample_id, "sample id"),
               "created_at": v.now()}

        def tx(db: Database) -> int:
            if sample_id is not None:
                self._require(db, "samples", sample_id, "sample")
            if rater_id is not None:
                self._ensure_rater(db, rater_id)
            return db["prompt_edits"].insert(row).last_pk

        return self._write(tx)
