"""Prompt fidelity judges: how well each image (or clip) shows what its prompt asks for.

A rater sees only the prompts they rate; a reward proxy learnt from a few dozen of their
judgements knows nothing about the rest, and a round that raises it can quietly stop drawing
what prompts ask for. A judge scores that independently of the proxy, per image in [0, 1]:

- :class:`ShapesFidelity` (the built-in image model): the perception model's attribute heads
  against the words of the prompt, the shape's attributes conditioned on the presence model
  (``rlr_core/shapesworld/presence.py``: a shape of the world's sizes, or only a speck?).
  ``score``: the mean over the attributes it names of p(attribute = value | image), times
  p(a shape is shown) for the shape's own, differentiable, so a round can add it to its reward;
  ``accuracy``: the fraction of them the heads read back surely (p >= 0.99) on an image the
  presence model says shows a shape (the background on any), what the guard decides on.
- :class:`ClipsFidelity` (the built-in clip model): the same with the clip perception model,
  whose heads read kind, colour, size and background from the frames and direction and speed
  from the motion (a speed counts only for a moving clip).
- :class:`ClipTextImageFidelity` (Stable Diffusion, AnimateDiff): CLIP's cosine similarity of
  the image (each frame of a clip, averaged) with its prompt. Its scale depends on the CLIP
  model and the prompt, so it is ``relative``: compare it with the base model's on the same
  prompts and noise, not with a fixed number.

``DiffusionBackend.fidelity_judge`` gives the judge of a backend, or None when it has none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F


class FidelityJudge(Protocol):
    name: str
    differentiable: bool  # scores carry gradients to the pixels (a round may add them to its reward)
    relative: bool  # scores mean something only against another version's on the same probes

    def judges(self, prompt: str) -> bool:
        """Whether the prompt asks for anything this judge can check."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) fidelity of each image to its prompt, in [0, 1] (differentiable when ``differentiable``)."""

    def to(self, device: str | torch.device) -> FidelityJudge:
        """Move the judge's models to ``device`` in place; returns the judge."""

    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) the verdict's measure, in [0, 1]: for attribute judges the fraction of the named
        attributes read back (a confident-but-right image is not penalised, as the soft score
        is); for similarity judges the score itself."""


def _attribute_read_back(logits: dict[str, torch.Tensor], wanted: list[dict[str, str]],
                         values: dict[str, tuple[str, ...]], confidence: float,
                         shown: Sequence[bool] | None = None,
                         needs_shape: frozenset[str] = frozenset()) -> list[dict[str, bool]]:
    """Per row, per named attribute: whether the named value is the most likely one, with a
    probability of at least ``confidence`` (0: the most likely value is enough). When ``shown``
    says a row shows no shape, none of its ``needs_shape`` attributes is read back."""
    probs = {name: lg.softmax(-1) for name, lg in logits.items()}
    best = {name: p.argmax(-1) for name, p in probs.items()}
    return [{a: int(best[a][i]) == values[a].index(v) and float(probs[a][i, values[a].index(v)]) >= confidence
             and (shown is None or a not in needs_shape or bool(shown[i]))
             for a, v in attrs.items()} for i, attrs in enumerate(wanted)]


def _attribute_accuracy(rows: list[dict[str, bool]]) -> torch.Tensor:
    """Fraction of each row's named attributes read back (:func:`_attribute_read_back`); 1 for none."""
    return torch.tensor([sum(r.values()) / len(r) if r else 1.0 for r in rows])


def _attribute_fidelity(logits: dict[str, torch.Tensor], wanted: list[dict[str, str]],
                        values: dict[str, tuple[str, ...]], p_shown: torch.Tensor | None = None,
                        needs_shape: frozenset[str] = frozenset()) -> torch.Tensor:
    """Mean over each row's named attributes of p(attribute = value), times p(a shape is shown) for
    the ``needs_shape`` ones when ``p_shown`` is given; 1 for a row naming none."""
    probs = {name: lg.softmax(-1) for name, lg in logits.items()}
    rows = []
    for i, attrs in enumerate(wanted):
        terms = [probs[a][i, values[a].index(v)] * (p_shown[i] if p_shown is not None and a in needs_shape else 1.0)
                 for a, v in attrs.items()]
        rows.append(torch.stack(terms).mean() if terms else probs[next(iter(probs))].new_tensor(1.0))
    return torch.stack(rows)


class AttributeFidelity:
    """A judge that reads attributes with a perception model's heads: ``score`` is the mean over
    the prompt's named attributes of p(attribute = value), ``accuracy`` the fraction read back.
    Subclasses name the model, its attribute values and how a prompt names them, and may add a
    ``presence`` model (one logit: does the image show a shape at all?) that the attributes in
    ``needs_shape`` are conditioned on."""

    name = "attributes"
    differentiable = True
    relative = False
    confidence = 0.0  # how sure the heads must be of a value for ``accuracy`` to count it as read back
    needs_shape: frozenset[str] = frozenset()

    def __init__(self, model: torch.nn.Module, values: dict[str, tuple[str, ...]],
                 presence: torch.nn.Module | None = None):
        self.model = model.requires_grad_(False)
        self.values = values
        self.presence = presence.requires_grad_(False) if presence is not None else None

    @property
    def reading(self) -> str:
        """The rule ``accuracy`` reads by (a probe cache keeps scores read by another rule apart)."""
        return f"accuracy@{self.confidence}" + ("+presence" if self.presence is not None else "")

    def to(self, device: str | torch.device) -> AttributeFidelity:
        self.model.to(device)
        if self.presence is not None:
            self.presence.to(device)
        return self

    def wanted(self, prompt: str) -> dict[str, str]:
        raise NotImplementedError

    def judges(self, prompt: str) -> bool:
        return bool(self.wanted(prompt))

    def _logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(images.to(self.model.coords.device))

    def p_shown(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B,) p(the image shows a shape at all), from the presence model; None without one."""
        if self.presence is None:
            return None
        return self.presence(images.to(self.presence.coords.device)).sigmoid()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        wanted = [self.wanted(p) for p in prompts]
        return _attribute_fidelity(self._logits(images), wanted, self.values, self.p_shown(images),
                                   self.needs_shape).to(images.device)

    @torch.no_grad()
    def read_back(self, images: torch.Tensor, prompts: Sequence[str]) -> list[dict[str, bool]]:
        """Per image, per attribute its prompt names: whether the heads read it back (see ``confidence``;
        with a presence model, a shape's attributes only on an image that shows one)."""
        p_shown = self.p_shown(images)
        shown = None if p_shown is None else (p_shown >= 0.5).tolist()
        return _attribute_read_back(self._logits(images), [self.wanted(p) for p in prompts], self.values,
                                    self.confidence, shown, self.needs_shape)

    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return _attribute_accuracy(self.read_back(images, prompts))


class ShapesFidelity(AttributeFidelity):
    """The built-in image model's judge: the shipped perception model, and the presence model that
    tells a shape from a speck (see the module docstring)."""

    name = "perception"
    # A shape drawn out of true (a circle gone square-ish) still reads as the kind asked for, but
    # less surely. Counting only sure readings, the guard read the whole of the pixel-judged loss of
    # a version trained to hack fidelity, with the fidelity term too, where argmax read half
    # (bench/guard_judge.py, docs/benchmarks.md).
    confidence = 0.99
    # The perception model reads a kind, colour, size and position from any image, a speck too: it
    # never saw one. The background it reads either way.
    needs_shape = frozenset({"kind", "colour", "size", "position"})

    def __init__(self, perception=None, presence=None):
        from rlr_core.shapesworld import perception as perception_mod
        from rlr_core.shapesworld import presence as presence_mod
        from rlr_core.shapesworld import world as sw

        super().__init__(perception if perception is not None else perception_mod.load(), sw.ATTRIBUTES,
                         presence if presence is not None else presence_mod.load())

    def wanted(self, prompt: str) -> dict[str, str]:
        from rlr_core.shapesworld import world as sw

        return sw.parse_caption(prompt).specified()


class ClipsFidelity(AttributeFidelity):
    """The built-in clip model's judge: the clip perception model (see the module docstring)."""

    name = "clip-perception"

    def __init__(self, judge=None):
        from rlr_core.shapesworld import clip_perception, clips

        super().__init__(judge if judge is not None else clip_perception.load(), clips.CLIP_ATTRIBUTES)

    def wanted(self, prompt: str) -> dict[str, str]:
        from rlr_core.shapesworld import clips

        wanted = clips.parse_clip_caption(prompt).specified()
        if wanted.get("direction") == "still":
            wanted.pop("speed", None)  # a still clip has no speed to judge
        return wanted


class ClipTextImageFidelity:
    """CLIP text-image cosine similarity, clamped to [0, 1] (see the module docstring)."""

    name = "clip-similarity"
    differentiable = True
    relative = True

    def __init__(self, images, text_model, tokenizer, spec: str):
        self.images = images  # a CLIPImageEncoder: CLIP's preprocessing in torch, L2-normalised embeddings
        self.text_model = text_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec

    def to(self, device: str | torch.device) -> ClipTextImageFidelity:
        self.images.to(device)
        self.text_model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, source: str, device: str | torch.device = "cpu") -> ClipTextImageFidelity:
        """A folder or hub id holding a full CLIPModel (both towers, safetensors; a hub id is read
        from the local cache, else downloaded: ``encoders.clip_folder``)."""
        from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPTokenizer
        from transformers.utils import logging

        from rlr_core.feedback.encoders import CLIPImageEncoder, EncoderError, clip_folder

        images = CLIPImageEncoder.from_pretrained(source, device)
        label, source = source, clip_folder(source)
        previous = logging.get_verbosity()
        logging.set_verbosity_error()  # a full CLIPModel's vision weights are expected leftovers
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
            if config.model_type != "clip":
                raise ValueError(f"it holds a {config.model_type!r} model, not a full CLIPModel")
            text_config = config.text_config
            text_config.projection_dim = config.projection_dim  # not carried over by the sub-config
            text = CLIPTextModelWithProjection.from_pretrained(source, config=text_config, local_files_only=True,
                                                               use_safetensors=True)
            tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise EncoderError(f"{label!r} has no CLIP text tower and tokenizer to judge prompt fidelity "
                               f"with: {err}") from err
        finally:
            logging.set_verbosity(previous)
        return cls(images, text.to(device), tokenizer, spec=f"clip:{label}")

    def judges(self, prompt: str) -> bool:
        return bool(prompt.strip())

    @torch.no_grad()
    def _text(self, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.text_model.parameters()).device
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        return F.normalize(self.text_model(**tokens).text_embeds.float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        text = self._text(prompts).to(images.device)
        if images.dim() == 5:  # clips: every frame against the prompt, averaged
            b, f = images.shape[:2]
            frames = self.images.embed(images.flatten(0, 1)).unflatten(0, (b, f))
            sims = (frames * text[:, None]).sum(-1).mean(1)
        else:
            sims = (self.images.embed(images) * text).sum(-1)
        return sims.clamp(0.0, 1.0)

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(images, prompts)


@functools.cache
def shapes_judge() -> ShapesFidelity:
    """The built-in image model's judge, loaded once per process."""
    return ShapesFidelity()


@functools.cache
def clips_judge() -> ClipsFidelity:
    """The built-in clip model's judge, loaded once per process."""
    return ClipsFidelity()


@functools.cache
def clip_similarity_judge(source: str, device: str = "cpu") -> ClipTextImageFidelity:
    """CLIP text-image similarity from ``source``, loaded once per process and device."""
    return ClipTextImageFidelity.from_pretrained(source, device)


def clip_source(reward_encoder: str | None) -> str | None:
    """The CLIP model named by a ``--reward-encoder`` spec ("clip:<id or folder>"), else None."""
    if reward_encoder and reward_encoder.startswith("clip:"):
        source = reward_encoder[len("clip:"):].strip()
        return source or None
    return None
