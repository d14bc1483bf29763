"""The built-in model's word-level tokenizer and prompt validation.

The tokenizer is a `tokenizers` WordLevel model wrapped as a transformers
``PreTrainedTokenizerFast``, so it saves and loads with ``save_pretrained``/``from_pretrained``
like any other. Unknown words are reported by name (``UnknownWordsError``) instead of being
mapped silently to an unknown token.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlr_core.backends.base import PromptError  # the generic prompt error; the grammar raises it
from rlr_core.shapesworld import world as sw

MAX_TOKENS = 16  # bos + up to 14 words + eos; the grammar needs at most 12
MAX_PROMPT_CHARS = 500
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# Words the grammar uses, plus a few harmless synonyms a person is likely to type.
_GRAMMAR_WORDS = (
    ["a", "an", "the", "on", "in", "at", ",", "shape", "background", "with", "and", "of"]
    + list(sw.KINDS)
    + list(sw.COLOURS)
    + list(sw.BACKGROUNDS)
    + list(sw.SIZES)
    + list(sw.POSITIONS)
)
_SYNONYMS = {"big": "large", "little": "small", "centre": "center", "middle": "center",
             "grey": "gray", "violet": "purple"}
# The clip grammar's extra words (rlr_core/shapesworld/clips.py), appended after the image
# words so a clip tokenizer gives every image word the image model's id.
_MOTION_WORDS = ["moving", "slowly", "fast", "to", "up", "down", "standing", "still"]
_MOTION_SYNONYMS = {"quickly": "fast", "quick": "fast", "slow": "slowly"}


class UnknownWordsError(PromptError):
    def __init__(self, words: list[str], video: bool = False):
        self.words = words
        known = ", ".join(sorted(set(_known_words(video)) - {","}))
        super().__init__(
            f"unknown word{'s' if len(words) > 1 else ''}: {', '.join(words)}. "
            f"The built-in model knows: {known}."
        )


def _known_words(video: bool) -> list[str]:
    return _GRAMMAR_WORDS + (_MOTION_WORDS if video else [])


def vocabulary(video: bool = False) -> list[str]:
    words = list(dict.fromkeys(_known_words(video)))
    return SPECIAL_TOKENS + words


def split_words(prompt: str, video: bool = False) -> list[str]:
    """Lower-case words and commas, with synonyms mapped to grammar words."""
    synonyms = {**_SYNONYMS, **_MOTION_SYNONYMS} if video else _SYNONYMS
    return [synonyms.get(w, w) for w in re.findall(r"[a-z0-9']+|,", prompt.lower())]


def normalize_prompt(prompt: str) -> str:
    """Validate a prompt and return it in the tokenizer's canonical spelling.

    The empty prompt is allowed only through ``allow_empty`` in ``check_prompt``; this
    function raises ``PromptError`` with a message meant for the person who typed it.
    """
    return check_prompt(prompt, allow_empty=False)


def check_prompt(prompt: str, allow_empty: bool = False, video: bool = False) -> str:
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be text, not {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    words = split_words(prompt, video)
    if not [w for w in words if w != ","]:
        if allow_empty:
            return ""
        raise PromptError("the prompt is empty: describe a shape, e.g. 'a red circle'")
    known = set(_known_words(video))
    unknown = [w for w in dict.fromkeys(words) if w not in known]
    if unknown:
        raise UnknownWordsError(unknown, video)
    if len(words) + 2 > MAX_TOKENS:
        raise PromptError(
            f"prompt has {len(words)} words; the built-in model takes at most {MAX_TOKENS - 2}"
        )
    return " ".join(words).replace(" ,", ",")


def build_tokenizer(video: bool = False) -> PreTrainedTokenizerFast:
    """A fresh word-level tokenizer over the ShapesWorld vocabulary (``video``: with the clip
    grammar's words appended)."""
    vocab = {word: i for i, word in enumerate(vocabulary(video))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )
