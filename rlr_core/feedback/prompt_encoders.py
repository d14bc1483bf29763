"""Prompt encoders for the reward proxy: fixed-size features of prompts, rebuilt from their ``config()``.

- :class:`BagOfWordsPromptEncoder` (the built-in models): word indicators over the ShapesWorld
  vocabulary plus hashed bigrams; it ignores words it does not know.
- :class:`HashedWordsPromptEncoder` (free text, any diffusers model): hashed words and word
  bigrams, with no fixed vocabulary.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rlr_core.feedback.protocols import PromptEncoder
from rlr_core.shapesworld import text


class BagOfWordsPromptEncoder:
    """Word indicators over a vocabulary plus hashed word bigrams ("red background" differs
    from "red circle"). Unknown words are ignored. Generic: any vocabulary works."""

    kind = "bag-of-words"

    def __init__(self, vocabulary: Sequence[str] | None = None, bigram_buckets: int = 32):
        if vocabulary is None:
            vocabulary = [w for w in text.vocabulary() if w not in text.SPECIAL_TOKENS and w.isalnum()]
        self.vocabulary = list(vocabulary)
        self.bigram_buckets = bigram_buckets
        self._index = {w: i for i, w in enumerate(self.vocabulary)}
        self.dim = len(self.vocabulary) + bigram_buckets
        self._split = text.split_words

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.dim)
        for i, prompt in enumerate(prompts):
            words = [w for w in self._split(prompt) if w in self._index]
            for w in words:
                out[i, self._index[w]] = 1.0
            for a, b in zip(words, words[1:]):
                bucket = zlib.crc32(f"{a} {b}".encode()) % self.bigram_buckets
                out[i, len(self.vocabulary) + bucket] = 1.0
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocabulary": self.vocabulary, "bigram_buckets": self.bigram_buckets}


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def free_text_words(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


class HashedWordsPromptEncoder:
    """Any prompt -> word indicators hashed into ``word_buckets`` plus word-bigram indicators in
    ``bigram_buckets`` ("red car" differs from "car red"). No vocabulary: unseen words still
    count (and may share a bucket with another word; more buckets make that rarer)."""

    kind = "hashed-words"

    def __init__(self, word_buckets: int = 256, bigram_buckets: int = 64):
        if word_buckets < 1 or bigram_buckets < 0:
            raise ValueError("word_buckets must be >= 1 and bigram_buckets >= 0")
        self.word_buckets, self.bigram_buckets = word_buckets, bigram_buckets
        self.dim = word_buckets + bigram_buckets

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(prompts), self.dim)
        for i, prompt in enumerate(prompts):
            words = free_text_words(prompt)
            for w in words:
                out[i, zlib.crc32(w.encode()) % self.word_buckets] = 1.0
            if self.bigram_buckets:
                for a, b in zip(words, words[1:]):
                    out[i, self.word_buckets + zlib.crc32(f"{a} {b}".encode()) % self.bigram_buckets] = 1.0
        return out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "word_buckets": self.word_buckets, "bigram_buckets": self.bigram_buckets}


def default_prompt_encoder(prompts: Iterable[str]) -> PromptEncoder:
    """The ShapesWorld bag of words when every word of every prompt is in its vocabulary (the
    built-in model's prompts), else the free-text encoder."""
    bow = BagOfWordsPromptEncoder()
    known = set(bow.vocabulary)
    for prompt in prompts:
        if any(w not in known for w in bow._split(prompt) if w.isalnum()):
            return HashedWordsPromptEncoder()
    return bow


def prompt_encoder_from_config(config: dict[str, Any]) -> PromptEncoder:
    if config.get("kind") == BagOfWordsPromptEncoder.kind:
        return BagOfWordsPromptEncoder(config["vocabulary"], config["bigram_buckets"])
    if config.get("kind") == HashedWordsPromptEncoder.kind:
        return HashedWordsPromptEncoder(int(config["word_buckets"]), int(config["bigram_buckets"]))
    raise ValueError(f"unknown prompt encoder {config.get('kind')!r}")
