"""Which pair to show next: blind before/after pairs first, then the proxy's active selection.

After a round, the new version and its parent draw the same prompts from the same noise:
before/after pairs (``feedback_store.queries.is_before_after``). They measure the round, so they jump the queue;
the rest follows ``rlr_core.feedback.active_selection`` when a reward proxy exists, else the store's
default order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from feedback_store import FeedbackStore, PairCandidate, queries

BEFORE_AFTER_BONUS = 1e3  # larger than any active-selection log-score


def noise_keys(store: FeedbackStore, ids: Sequence[int]) -> dict[int, tuple | None]:
    """sample id -> its noise key (``queries.noise_key``): equal keys mean equal starting noise."""
    return {sid: queries.noise_key(seed, s) for sid, (seed, s) in store.noise_settings(ids).items()}


class PairScorer:
    """A ``scorer`` for ``FeedbackStore.next_pair``: before/after pairs first, then ``fallback``."""

    def __init__(self, store: FeedbackStore, fallback: Callable[[list[PairCandidate]], Sequence[float]] | None):
        self.store = store
        self.fallback = fallback
        self.rng = random.Random()

    def __call__(self, candidates: list[PairCandidate]) -> list[float]:
        ids = sorted({i for c in candidates for i in (c.left_id, c.right_id)})
        keys = noise_keys(self.store, ids)
        parents = {v["id"]: v["parent_id"] for v in self.store.model_versions()}
        if self.fallback is not None:
            base = [float(s) for s in self.fallback(candidates)]
        else:  # the store's own order: cross-version pairs, then prompts seen least recently
            base = queries.default_pair_scores(candidates, self.rng)
        return [b + (BEFORE_AFTER_BONUS if queries.is_before_after(c.left_version, c.right_version, keys.get(c.left_id),
                                                                   keys.get(c.right_id), parents) else 0.0)
                for b, c in zip(base, candidates)]
