"""Rounds must keep what the rater cannot see: prompt fidelity, measured before a version goes live.

The reward proxy knows only the prompts people rated; an exact gradient of it finds its blind
spots fastest. So every round is checked by the backend's fidelity judge
(:mod:`rlr_core.fidelity`), which the proxy never trained on:

- **Probes**: a fixed set of prompts, each drawn from its own fixed seed (so its noise is the
  same whatever else is probed), side effect free (nothing is
  stored as a sample): the prompts the round trained on, their prompt-lab stage prompts, and
  the backend's held-out prompts (ones the round did not see), keeping those the judge can
  check, at most the round's ``fidelity_probe_prompts``. Drawn like the Generate tab draws (the
  round's sample settings).
- **After the round** (:class:`Verdict`): the new version, its parent and the base model are
  judged on the same probes, by the judge's ``accuracy`` (for the built-in models the fraction
  of the named attributes read back: the soft score also fell for images that were still right,
  and flagged versions the pixels found faithful). Each version records ``fidelity``, ``fidelity_parent``,
  ``fidelity_base``, the drop and its paired standard error (per probe prompt, on the same
  noise). It is **flagged** when it falls more than the round's ``fidelity_threshold`` below its
  parent or below the base model (so small losses cannot add up over rounds), and by more than
  :data:`SIGNIFICANCE` standard errors (0: the point estimate decides), on all the probes or on
  either group of them judged apart: the round's own prompts, and the held-out ones (a loss on
  prompts nobody rated must not hide in the mean of the rated ones). That is the ``split`` rule;
  the ``attributes`` rule (the round's ``fidelity_rule``) takes every mean over the attributes
  the probes name instead, with no groups: a one-word prompt weighs one attribute, a fully
  specified one five. A flagged version is not made active, and auto-train does not build on it.
  The person can still activate it by hand. A relative judge (CLIP similarity) reports every
  version as a fraction of the base model's score on the same probes.
- **Inside the round** (:class:`FidelityWatch`): every ``every`` steps the training copy draws a
  smaller probe set (8 prompts, 2 images each); if it fell past the threshold below the parent's
  score on the same probes (by the verdict's rule, on the mean of all 8: too few to judge the
  groups apart), the adapter goes back to the last checked step that passed and the round ends
  there (an early stop that keeps the version).

The guard is as good as its judge. On the built-in model the judge is the perception model that
the round's fidelity term climbs; ``python -m bench.guard_judge`` measured what it reads of a
pixel-judged loss. Counting an attribute as read back whenever it is the heads' most likely
value read about three quarters of it for a round trained without the term and half for one
trained with it, mostly by reading a distorted shape's kind as asked; counting only sure
readings (the judge's ``confidence``, 0.99) read all of both, at the price of a few more
sampling alarms on faithful versions (5-16 % of 32-image draws against 5-11 %;
docs/benchmarks.md). A second perception model of the same recipe read what
the first read, so it would not be an independent judge.

Scores of a version on a probe are cached in ``fidelity_probes.json`` (versions never change),
so the parent and the base are drawn once per probe prompt, not every round.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from app.generation import DrawFn, GenerationSettings, draw
from rlr_core.backends.base import DiffusionBackend
from rlr_core.training import lora
from rlr_core.training.defaults import DEFAULTS

PROBE_SEED = 424242  # fixed: every version is judged on the same noise
PROBE_IMAGES: int = DEFAULTS["fidelity_probe_images"]  # per prompt, after the round (a round setting)
MAX_PROBE_PROMPTS = 16
WATCH_PROMPTS = 8  # inside the round
WATCH_IMAGES = 2  # per prompt
# A drop counts when it passes the threshold and this many paired standard errors of it. 0: the
# point estimate decides. Measured on the loop (bench/loop.py, bench/results/loop_2se.json,
# "guard_against_pixels", 24 new versions judged from the pixels): asking for 2 SE flagged 1 of 17
# faithful versions but only 2 of 7 that lost more than 0.05; the point estimate would have
# flagged 5 of the 7 losses and 8 of the 17 faithful. A loss the rater cannot see costs more than
# a round the person activates by hand, so the point estimate decides (the note shows the SE).
SIGNIFICANCE = 0.0
FIDELITY_RULES = ("split", "attributes")  # how a drop is read (verdict)
CACHE_FILE = "fidelity_probes.json"


def probe_prompts(judge: Any, trained: Sequence[str], stages: Sequence[Sequence[str]], held_out: Sequence[str],
                  limit: int = MAX_PROBE_PROMPTS) -> list[str]:
    """The round's prompts, then their stage prompts, then held-out ones (at least a quarter of
    ``limit`` when there are enough), without repeats, keeping those the judge can check."""
    def usable(items: Sequence[str]) -> list[str]:
        return [p for p in dict.fromkeys(items) if judge.judges(p)]

    own = usable([*trained, *(s for st in stages for s in st)])
    others = [p for p in usable(held_out) if p not in own]
    n_held = min(len(others), max(limit // 4, limit - len(own)))
    return own[:limit - n_held] + others[:n_held]


def round_probes(judge: Any, prompts: Sequence[Any], held_out: Sequence[str], limit: int) -> list[str]:
    """The guard's probes of a round on ``prompts`` (the round's ``RoundPrompt`` rows: each prompt
    and its stage prompts), as :func:`probe_prompts` picks them; the drawing ahead
    (app/guard_prefetch.py) must ask for exactly these."""
    return probe_prompts(judge, [p.prompt for p in prompts], [p.stages.as_list() for p in prompts if p.stages],
                         held_out, limit)


def probe_seed(prompt: str, seed: int = PROBE_SEED) -> int:
    """Each probe prompt's own seed: its noise must not depend on which other prompts are probed
    with it (a batch's noise depends on each row's position and the batch size), or a version's
    cached scores would not be paired with a later version's on the same noise."""
    return (seed + zlib.crc32(prompt.encode())) % 2**31


@torch.no_grad()
def measure(backend: DiffusionBackend, judge: Any, prompts: Sequence[str], settings: GenerationSettings,
            per_prompt: int, seed: int = PROBE_SEED, draw_fn: DrawFn = draw) -> dict[str, float]:
    """The judge's mean accuracy per prompt, each prompt drawn ``per_prompt`` times from its own
    seed (:func:`probe_seed`). ``draw_fn``: :func:`app.generation.draw`, or it run elsewhere (a
    round's process: the same images, since every row has its own seed)."""
    texts = [p for p in prompts for _ in range(per_prompt)]
    if not texts:
        return {}
    images = draw_fn(backend, texts, seed, settings, row_seeds=[probe_seed(p, seed) for p in texts])  # one batch
    scores = judge.accuracy(images, texts).detach().float().cpu().view(len(prompts), per_prompt).mean(1)
    return {p: float(s) for p, s in zip(prompts, scores)}


class ProbeKey(NamedTuple):
    """What a cached score was measured on; stored as a JSON list in this order."""
    judge: str
    reading: str  # a stricter reading is another measure
    prompt: str
    seed: int
    per_prompt: int
    steps: int
    guidance: float
    eta: float

    @classmethod
    def of(cls, prompt: str, settings: GenerationSettings, per_prompt: int, judge: Any) -> ProbeKey:
        reading = getattr(judge, "reading", f"accuracy@{getattr(judge, 'confidence', 0.0)}")
        return cls(judge.name, reading, prompt, probe_seed(prompt), per_prompt, settings.steps, settings.guidance,
                   settings.eta)

    def dumps(self) -> str:
        return json.dumps(list(self))

    @classmethod
    def loads(cls, text: str) -> ProbeKey:
        return cls(*json.loads(text))

    def settings(self) -> GenerationSettings:
        return GenerationSettings(steps=self.steps, guidance=self.guidance, eta=self.eta)


class ProbeCache:
    """Per version, per probe (:class:`ProbeKey`): the judge's raw accuracy."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / CACHE_FILE
        self._lock = threading.Lock()

    @staticmethod
    def key(prompt: str, settings: GenerationSettings, per_prompt: int, judge: Any) -> str:
        return ProbeKey.of(prompt, settings, per_prompt, judge).dumps()

    def keys(self, version_id: int) -> list[ProbeKey]:
        """The probes cached for a version (a key that does not parse is skipped)."""
        with self._lock:
            stored = list(self._read().get(str(version_id), {}))
        keys = []
        for text in stored:
            try:
                keys.append(ProbeKey.loads(text))
            except (TypeError, ValueError):
                continue
        return keys

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a missing or damaged cache only costs drawing the probes again

    def scores(self, version_id: int, backend: DiffusionBackend, judge: Any, prompts: Sequence[str],
               settings: GenerationSettings, per_prompt: int = PROBE_IMAGES,
               draw_fn: DrawFn = draw) -> dict[str, float]:
        with self._lock:
            known = self._read().get(str(version_id), {})
        keys = {p: self.key(p, settings, per_prompt, judge) for p in prompts}
        missing = [p for p in prompts if keys[p] not in known]
        fresh = measure(backend, judge, missing, settings, per_prompt, draw_fn=draw_fn)
        self.remember(version_id, judge, fresh, settings, per_prompt)
        return {p: fresh[p] if p in fresh else known[keys[p]] for p in prompts}

    def remember(self, version_id: int, judge: Any, scores: dict[str, float], settings: GenerationSettings,
                 per_prompt: int = PROBE_IMAGES) -> None:
        """Store a version's scores per prompt (as :func:`measure` gives them) under their probe keys."""
        if not scores:
            return
        keyed = {self.key(p, settings, per_prompt, judge): v for p, v in scores.items()}
        with self._lock:
            data = self._read()
            data.setdefault(str(version_id), {}).update(keyed)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)


def mean(scores: dict[str, float], weights: dict[str, float] | None = None) -> float:
    """The mean score over the prompts, or with ``weights`` (per prompt) the weighted mean."""
    if weights is None:
        return sum(scores.values()) / len(scores)
    return sum(weights[p] * v for p, v in scores.items()) / sum(weights[p] for p in scores)


def paired_drop(before: dict[str, float], after: dict[str, float],
                weights: dict[str, float] | None = None) -> tuple[float, float]:
    """(mean over the shared prompts of before - after, its standard error from the per-prompt
    differences; 0 with fewer than two prompts, where the point estimate alone decides). With
    ``weights`` (per prompt), the weighted mean and its standard error (each prompt's difference
    an independent draw, weighted)."""
    shared = [p for p in after if p in before]
    diffs = [before[p] - after[p] for p in shared]
    w = [1.0 if weights is None else float(weights[p]) for p in shared]
    n, total = len(diffs), sum(w)
    if n == 0 or total <= 0:
        return 0.0, 0.0
    m = sum(wi * d for wi, d in zip(w, diffs)) / total
    if n < 2:
        return m, 0.0
    var = sum(wi ** 2 * (d - m) ** 2 for wi, d in zip(w, diffs)) / total ** 2 * n / (n - 1)
    return m, var ** 0.5


def beyond(drop: float, se: float, threshold: float, significance: float = SIGNIFICANCE) -> bool:
    """A drop that counts (see :data:`SIGNIFICANCE`): past the threshold, and past ``significance``
    standard errors."""
    return threshold > 0 and drop > threshold and drop > significance * se


@dataclass(frozen=True)
class GroupDrop:
    """One group of probes (the round's own prompts, or the held-out ones) judged apart."""
    group: str
    probes: int
    drop: float  # below the parent
    drop_se: float
    drop_from_base: float
    drop_from_base_se: float


GROUP_NAMES = {"rated": "the round's prompts", "held_out": "prompts the round did not see"}


@dataclass(frozen=True)
class Verdict:
    fidelity: float  # the new version's (relative judges: as a fraction of the base model's)
    fidelity_parent: float
    fidelity_base: float
    threshold: float
    probes: int  # prompts judged
    judge: str
    drop_se: float = 0.0  # paired standard errors of the two drops (same scale as the fidelities)
    drop_from_base_se: float = 0.0
    # Each group of probes apart: a loss on the prompts nobody rated must not hide in the mean of
    # the rated ones (on the loop most pixel-judged losses were on unrated prompts).
    groups: tuple[GroupDrop, ...] = ()
    rule: str = "split"  # "attributes": every mean is over the attributes the probes name

    @property
    def drop(self) -> float:
        return self.fidelity_parent - self.fidelity

    @property
    def drop_from_base(self) -> float:
        return self.fidelity_base - self.fidelity

    def counted_drops(self) -> list[tuple[float, float, str, str]]:
        """(drop, SE, against whom, which probes) of every drop that counts."""
        candidates = [(self.drop, self.drop_se, "its parent", "all"),
                      (self.drop_from_base, self.drop_from_base_se, "the base model", "all")]
        for g in self.groups:
            candidates += [(g.drop, g.drop_se, "its parent", g.group),
                           (g.drop_from_base, g.drop_from_base_se, "the base model", g.group)]
        return [c for c in candidates if beyond(c[0], c[1], self.threshold)]

    def _worst(self) -> tuple[float, float, str, str] | None:
        """The largest drop that counts (what the note reports), or None."""
        counted = self.counted_drops()
        return max(counted, key=lambda c: c[0]) if counted else None

    @property
    def flagged_against_parent(self) -> bool:
        return any(c[2] == "its parent" for c in self.counted_drops())

    @property
    def flagged_against_base(self) -> bool:
        return any(c[2] == "the base model" for c in self.counted_drops())

    @property
    def flagged(self) -> bool:
        return self._worst() is not None

    def note(self, name: str) -> str:
        """One line for the Train and Versions tabs."""
        worst = self._worst()
        if worst is None:
            return (f"prompt fidelity kept: {self.fidelity:.3f} (parent {self.fidelity_parent:.3f}, "
                    f"base {self.fidelity_base:.3f}) on {self.probes} probe prompts{self._weighing()}")
        return f"{name} {self.loss()}; it was not made active"

    def loss(self) -> str:
        """What was lost, in words ("lost prompt fidelity: ..."); empty when nothing counted."""
        worst = self._worst()
        if worst is None:
            return ""
        drop, se, against, group = worst
        where = (f"on {self.probes} probe prompts{self._weighing()}" if group == "all" else
                 f"on {GROUP_NAMES.get(group, group)} ({next(g.probes for g in self.groups if g.group == group)} "
                 f"of {self.probes} probe prompts)")
        return (f"lost prompt fidelity: {self.fidelity:.3f} against {self.fidelity_parent:.3f} for its "
                f"parent and {self.fidelity_base:.3f} for the base, {drop:.3f} ± {se:.3f} below {against} "
                f"{where} (more than the threshold {self.threshold:.2f})")

    def _weighing(self) -> str:
        return ", each attribute they name weighed alike" if self.rule == "attributes" else ""

    def largest_drops(self) -> dict[str, float]:
        """For all probes ("all") and each group judged apart, the larger of its drops below the
        parent and below the base."""
        return {"all": max(self.drop, self.drop_from_base),
                **{g.group: max(g.drop, g.drop_from_base) for g in self.groups}}

    def metrics(self) -> dict[str, Any]:
        per_group = {f"fidelity_drop_{group}": round(drop, 4) for group, drop in self.largest_drops().items()
                     if group != "all"}
        return {"fidelity": round(self.fidelity, 4), "fidelity_parent": round(self.fidelity_parent, 4),
                "fidelity_base": round(self.fidelity_base, 4), "fidelity_drop": round(self.drop, 4),
                "fidelity_drop_from_base": round(self.drop_from_base, 4), "fidelity_drop_se": round(self.drop_se, 4),
                "fidelity_drop_from_base_se": round(self.drop_from_base_se, 4), "fidelity_threshold": self.threshold,
                "fidelity_flagged": self.flagged, "fidelity_probes": self.probes, "fidelity_judge": self.judge,
                "fidelity_rule": self.rule,
                **per_group}


def attribute_weights(judge: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Per probe prompt, how many attributes it names (the ``attributes`` rule's weights); 1 each
    for a judge that reads no attributes (CLIP similarity)."""
    wanted = getattr(judge, "wanted", None)
    return {p: float(max(1, len(wanted(p)))) if wanted else 1.0 for p in prompts}


def verdict(judge: Any, new: dict[str, float], parent: dict[str, float], base: dict[str, float],
            threshold: float, held_out: Sequence[str] = (), rule: str = "split") -> Verdict:
    """Compare the three versions' scores on the same probes (see the module docstring). Rule
    ``split``: with ``held_out`` (the backend's held-out prompts), the probes among them and the
    rest are also judged apart, and a drop in either group counts. Rule ``attributes``: every
    mean is over the attributes the probes name (:func:`attribute_weights`), with no groups."""
    if rule not in FIDELITY_RULES:
        raise ValueError(f"unknown fidelity rule {rule!r}; the rules are {', '.join(FIDELITY_RULES)}")
    weights = attribute_weights(judge, list(new)) if rule == "attributes" else None

    def weighted(scores: dict[str, float]) -> float:
        return mean({p: scores[p] for p in new}, weights)

    scale = 1.0
    if judge.relative:  # a fraction of the base model's score
        scale = weighted(base) if weighted(base) > 0 else 1.0

    def drops(prompts: Sequence[str]) -> tuple[float, float, float, float]:
        sub = {p: new[p] for p in prompts}
        d_parent, se_parent = paired_drop(parent, sub, weights)
        d_base, se_base = paired_drop(base, sub, weights)
        return d_parent / scale, se_parent / scale, d_base / scale, se_base / scale

    held = set(held_out) if rule == "split" else set()
    split = {"rated": [p for p in new if p not in held], "held_out": [p for p in new if p in held]}
    groups = tuple(GroupDrop(name, len(ps), *drops(ps)) for name, ps in split.items() if ps) if held else ()
    if len(groups) < 2:
        groups = ()  # one group is the whole set
    _, se_parent, _, se_base = drops(list(new))
    f_new, f_parent, f_base = weighted(new) / scale, weighted(parent) / scale, weighted(base) / scale
    if judge.relative:
        f_base = 1.0
    return Verdict(f_new, f_parent, f_base, threshold, len(new), judge.name, se_parent, se_base, groups, rule)


class FidelityWatch:
    """The in-round check (see the module docstring): ``check(step)`` after each step; True
    means the round must end now, with the adapter already back at the last good step."""

    def __init__(self, backend: DiffusionBackend, judge: Any, prompts: Sequence[str],
                 settings: GenerationSettings, threshold: float, every: int,
                 reference: dict[str, float] | None = None, draw_fn: DrawFn = draw, rule: str = "split"):
        self.backend, self.judge, self.settings, self.draw_fn = backend, judge, settings, draw_fn
        self.prompts = list(prompts)[:WATCH_PROMPTS]
        # the verdict's rule on the mean of all 8 (too few to judge groups apart)
        self.weights = attribute_weights(judge, self.prompts) if rule == "attributes" else None
        self.threshold, self.every = threshold, every
        self.params = lora.lora_parameters(backend) if lora.has_lora(backend) else []
        # the parent, as the round found it: its cached probe scores when given (the training copy
        # starts as the parent, so they are the copy's own), else drawn now
        known = reference is not None and all(p in reference for p in self.prompts)
        self.reference_scores = {p: reference[p] for p in self.prompts} if known else self._scores()
        self.reference = mean(self.reference_scores, self.weights) if self.reference_scores else 0.0
        self.good = self._snapshot()
        self.good_step = 0
        self.stopped_at: int | None = None
        self.last: float | None = self.reference

    @property
    def active(self) -> bool:
        return bool(self.prompts) and self.every > 0 and self.threshold > 0 and bool(self.params)

    def _scores(self) -> dict[str, float]:
        return measure(self.backend, self.judge, self.prompts, self.settings, WATCH_IMAGES, draw_fn=self.draw_fn)

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def check(self, step: int) -> bool:
        if not self.active or step % self.every:
            return False
        scores = self._scores()
        self.last = mean(scores, self.weights)
        if beyond(*paired_drop(self.reference_scores, scores, self.weights), self.threshold):
            for p, saved in zip(self.params, self.good):
                p.copy_(saved)
            self.stopped_at = step
            return True
        self.good, self.good_step = self._snapshot(), step
        return False

    def metrics(self) -> dict[str, Any]:
        return {"watch_fidelity_start": round(self.reference, 4),
                "watch_fidelity_last": None if self.last is None else round(self.last, 4),
                "fidelity_stopped_at": self.stopped_at,
                "fidelity_kept_step": self.good_step if self.stopped_at is not None else None}
