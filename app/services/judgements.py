"""Judgements: stars for a sample, blind pairwise comparisons, and what each rater sees next.

A recorded judgement may start a training round (``after_judgement``: the rounds' auto-train)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app import validate as check
from app.pairs import PairScorer
from feedback_store import OUTCOMES, FeedbackStore


class Judgements:
    def __init__(self, store: FeedbackStore, sample: Callable[[Any], dict[str, Any]],
                 after_judgement: Callable[[], Any], selection_scorer: Callable[[], Any]):
        self.store = store
        self.sample = sample  # a stored sample as the pages show it (Generation.sample)
        self.after_judgement = after_judgement
        self.selection_scorer = selection_scorer  # the reward proxy's active selection, or None

    def my_rating(self, sample_id: int, rater: str) -> int | None:
        return self.store.star_rating(sample_id, rater)

    def rate(self, sample_id: Any, rater: Any, stars: Any) -> dict[str, Any]:
        """Record (or change) this rater's stars for a sample."""
        rater = check.rater(rater)
        sid = check.sample_id(sample_id)
        stars = check.whole(stars, "stars", 1, 5)
        rating_id = self.store.add_rating(sid, rater, stars, replace=True)
        self.after_judgement()
        return {"rating_id": rating_id, "sample_id": sid, "stars": stars, "rater": rater}

    def to_rate(self, rater: Any, limit: Any = 8) -> list[dict[str, Any]]:
        """Samples this rater has not rated yet, newest model version first."""
        rows = self.store.next_samples_to_rate(check.rater(rater), check.whole(limit, "limit", 1, 64))
        return [self.sample(r["id"]) for r in rows]

    def next_pair(self, rater: Any) -> dict[str, Any] | None:
        """The next two samples (same prompt) to compare; None when there is nothing to compare."""
        pair = self.store.next_pair(check.rater(rater), scorer=PairScorer(self.store, self.selection_scorer()))
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
        self.after_judgement()
        return {"comparison_id": cid, **self.comparison_counts(rater)}

    def comparison_counts(self, rater: str | None) -> dict[str, int]:
        return self.store.comparison_counts(rater)
