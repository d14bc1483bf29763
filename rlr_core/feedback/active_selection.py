"""Active pair selection: ask about the pairs the reward ensemble disagrees on most.

The score of a pair is the spread (std) across ensemble heads of P(left beats right): high
where the heads' answers differ, i.e. where a human answer teaches the most. Pure greedy
choice would ask near-duplicates again and again, so selection adds
- randomness: Gumbel noise on log-scores (a softmax draw with a low temperature), and with
  probability ``epsilon`` a uniformly random pair (exploration, in case the ensemble is
  confidently wrong);
- prompt diversity: a penalty per recent (or already chosen) pair of the same prompt.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from feedback_store.queries import PairCandidate
from rlr_core.feedback.reward_proxy import RewardProxy, load_image_tensor


@torch.no_grad()
def disagreement_from_features(proxy: RewardProxy, emb_left: torch.Tensor, emb_right: torch.Tensor,
                               prompt_feats: torch.Tensor) -> torch.Tensor:
    """(M,) std across heads of P(left beats right), from precomputed embeddings."""
    r_l = proxy.heads_from_features(emb_left, prompt_feats)
    r_r = proxy.heads_from_features(emb_right, prompt_feats)
    return torch.sigmoid(r_l - r_r).std(0)


@torch.no_grad()
def pair_disagreement(proxy: RewardProxy, left: torch.Tensor, right: torch.Tensor,
                      prompts: Sequence[str]) -> torch.Tensor:
    return proxy.win_probs(left, right, prompts).std(0)


@dataclasses.dataclass
class SelectionPolicy:
    temperature: float = 0.1  # on log-scores; 0 = greedy
    epsilon: float = 0.1  # chance of a uniformly random pick
    diversity: float = 1.0  # log-score penalty per recent pair of the same prompt

    def adjusted(self, scores: np.ndarray, prompt_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        logs = np.log(np.asarray(scores, dtype=np.float64) + 1e-6) - self.diversity * prompt_counts
        if self.temperature > 0:
            logs = logs + self.temperature * rng.gumbel(size=len(logs))
        return logs

    def select(self, scores: Sequence[float], prompts: Sequence[str], k: int, rng: np.random.Generator,
               recent: Counter | None = None) -> list[int]:
        """Indices of ``k`` distinct candidates to ask about next."""
        scores = np.asarray(scores, dtype=np.float64)
        counts = Counter(recent or {})
        chosen: list[int] = []
        available = np.ones(len(scores), dtype=bool)
        for _ in range(min(k, len(scores))):
            if rng.random() < self.epsilon:
                i = int(rng.choice(np.flatnonzero(available)))
            else:
                pc = np.array([counts[p] for p in prompts], dtype=np.float64)
                adj = np.where(available, self.adjusted(scores, pc, rng), -np.inf)
                i = int(np.argmax(adj))
            chosen.append(i)
            available[i] = False
            counts[prompts[i]] += 1
        return chosen


class DisagreementScorer:
    """A ``scorer`` for ``FeedbackStore.next_pair``: returns adjusted scores whose argmax is the
    pair to show (the store takes the argmax). Caches image embeddings by sample id (a sample's
    image never changes) and encodes each distinct prompt once: this runs on every next pair,
    over every candidate, so under a crowd it was a third of the server's time."""

    def __init__(self, proxy: RewardProxy, policy: SelectionPolicy | None = None, seed: int | None = None):
        self.proxy = proxy
        self.policy = policy or SelectionPolicy()
        self.rng = np.random.default_rng(seed)
        self._cache: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def _embed(self, samples: dict[int, Path]) -> None:
        """Embed the samples (id -> image file) not cached yet."""
        missing = sorted(i for i in samples if i not in self._cache)
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            emb = self.proxy.image_encoder.embed(load_image_tensor([samples[i] for i in chunk]))
            self._cache.update(zip(chunk, emb))

    def __call__(self, candidates: Sequence[PairCandidate]) -> list[float]:
        n = len(candidates)
        if self.rng.random() < self.policy.epsilon:
            return list(self.rng.random(n))
        new = {}
        for c in candidates:  # paths are built only for images not embedded yet
            if c.left_id not in self._cache:
                new[c.left_id] = c.left_path
            if c.right_id not in self._cache:
                new[c.right_id] = c.right_path
        self._embed(new)
        distinct = sorted({c.prompt for c in candidates})
        row = {p: i for i, p in enumerate(distinct)}
        prompt_features = self.proxy.prompt_encoder.encode(distinct)[[row[c.prompt] for c in candidates]]
        scores = disagreement_from_features(
            self.proxy, torch.stack([self._cache[c.left_id] for c in candidates]),
            torch.stack([self._cache[c.right_id] for c in candidates]), prompt_features)
        counts = np.array([c.recent_prompt_count for c in candidates], dtype=np.float64)
        return list(self.policy.adjusted(scores.numpy(), counts, self.rng))
