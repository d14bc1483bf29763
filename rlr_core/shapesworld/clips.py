"""ShapesWorld clips: one shape moving over 8 frames of 32x32.

A clip scene is an image scene's shape, colour, size and background plus a motion: a direction
(right, left, up, down, or still) and a speed (slow or fast). The path is centred near the
middle of the frame, so a fast shape crosses most of it. Captions come from a grammar like the
images' ("a large red circle moving fast to the right, black background"); a still shape is
"standing still", and its speed is not part of the clip (it is kept as "slow" and never judged).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator

import numpy as np

from rlr_core.shapesworld import world as sw

NUM_FRAMES = 8
DIRECTIONS: dict[str, tuple[float, float]] = {  # unit step in (x, y) pixels, y down
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "still": (0.0, 0.0),
}
SPEEDS: dict[str, float] = {"slow": 1.0, "fast": 2.25}  # pixels per frame

CLIP_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "kind": sw.KINDS,
    "colour": tuple(sw.COLOURS),
    "size": tuple(sw.SIZES),
    "direction": tuple(DIRECTIONS),
    "speed": tuple(SPEEDS),
    "background": tuple(sw.BACKGROUNDS),
}

_DIRECTION_PHRASE = {"right": "to the right", "left": "to the left", "up": "up", "down": "down"}
_SPEED_WORD = {"slow": "slowly", "fast": "fast"}


@dataclasses.dataclass(frozen=True)
class ClipScene:
    """A fully specified clip: every attribute has a value."""

    kind: str
    colour: str
    size: str
    direction: str
    speed: str
    background: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @property
    def moving(self) -> bool:
        return self.direction != "still"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.kind) in sw.HELD_OUT_PAIRS


@dataclasses.dataclass(frozen=True)
class PartialClipScene:
    """What a clip caption specifies; ``None`` leaves the attribute open."""

    kind: str | None = None
    colour: str | None = None
    size: str | None = None
    direction: str | None = None
    speed: str | None = None
    background: str | None = None

    def specified(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def complete(self, rng: random.Random, allow_held_out: bool = True) -> ClipScene:
        for _ in range(1000):
            values = {name: getattr(self, name) or rng.choice(options)
                      for name, options in CLIP_ATTRIBUTES.items()}
            if values["direction"] == "still":
                values["speed"] = "slow"  # a still shape has no speed
            scene = ClipScene(**values)
            if allow_held_out or not scene.held_out:
                return scene
        raise ValueError(f"cannot complete {self} without a held-out pair")


def clip_caption(scene: ClipScene | PartialClipScene) -> str:
    """'a [size] [colour] [kind|shape] [moving [slowly|fast] [direction] | standing still][, bg background]'."""
    words = ["a"]
    if scene.size:
        words.append(scene.size)
    if scene.colour:
        words.append(scene.colour)
    words.append(scene.kind or "shape")
    if scene.direction == "still":
        words += ["standing", "still"]
    elif scene.direction or scene.speed:
        words.append("moving")
        if scene.speed:
            words.append(_SPEED_WORD[scene.speed])
        if scene.direction:
            words.append(_DIRECTION_PHRASE[scene.direction])
    text = " ".join(words)
    if scene.background:
        text += f", {scene.background} background"
    return text


def parse_clip_caption(text: str) -> PartialClipScene:
    """Inverse of :func:`clip_caption` for any prompt of known words, in any order."""
    words = text.lower().replace(",", " , ").split()
    found: dict[str, str] = {}
    speed_words = {"slowly": "slow", "slow": "slow", "fast": "fast", "quickly": "fast", "quick": "fast"}
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if nxt == "background" and (word in sw.BACKGROUNDS or word in sw.COLOURS):
            found["background"] = word
        elif word in sw.COLOURS:
            found["colour"] = word
        elif word in sw.KINDS:
            found["kind"] = word
        elif word in sw.SIZES:
            found["size"] = word
        elif word in DIRECTIONS:
            found["direction"] = word
        elif word in speed_words:
            found["speed"] = speed_words[word]
    if found.get("direction") == "still":
        found.pop("speed", None)
    return PartialClipScene(**found)


def path(scene: ClipScene, rng: np.random.Generator) -> np.ndarray:
    """The shape's centre (x, y) in each frame, (NUM_FRAMES, 2): centred near the middle."""
    centre = np.array([16.0 + rng.uniform(-2.0, 2.0), 16.0 + rng.uniform(-2.0, 2.0)])
    step = np.array(DIRECTIONS[scene.direction]) * SPEEDS[scene.speed]
    offsets = np.arange(NUM_FRAMES) - (NUM_FRAMES - 1) / 2
    return centre + offsets[:, None] * step


def render_clip(scene: ClipScene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a clip to float32 (NUM_FRAMES, 32, 32, 3) in [0, 1]; one jitter draw per clip
    (colour, size), so only the position changes from frame to frame."""
    rng = rng or np.random.default_rng()
    bg = np.clip(np.array(sw.BACKGROUNDS[scene.background]) + rng.normal(0, 0.02, 3), 0, 1)
    fg = np.clip(np.array(sw.COLOURS[scene.colour]) + rng.normal(0, 0.03, 3), 0, 1)
    r = sw.SIZES[scene.size] * rng.uniform(0.9, 1.1)
    frames = []
    for cx, cy in path(scene, rng):
        alpha = sw.shape_mask(scene.kind, cx, cy, r)
        image = alpha * fg + (1 - alpha) * bg
        image += rng.normal(0, 0.01, image.shape)
        frames.append(np.clip(image, 0, 1))
    return np.stack(frames).astype(np.float32)


def random_partial_clip(rng: random.Random, scene: ClipScene, drop_prob: float,
                        drop_overrides: dict[str, float] | None = None) -> PartialClipScene:
    """Forget each attribute with probability ``drop_prob`` (``drop_overrides``: per attribute)."""
    probs = drop_overrides or {}
    kept = {k: v for k, v in scene.as_dict().items() if rng.random() >= probs.get(k, drop_prob)}
    if scene.direction == "still":
        kept.pop("speed", None)
    return PartialClipScene(**kept)


def training_clips(seed: int, drop_prob: float = 0.3, allow_held_out: bool = False,
                   drop_overrides: dict[str, float] | None = None, fixed: dict[str, str] | None = None,
                   ) -> Iterator[tuple[np.ndarray, str, ClipScene]]:
    """An endless stream of (clip, caption, scene); captions omit attributes at random.
    ``fixed`` pins attributes of every scene (a curriculum's narrow first stages)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    while True:
        scene = PartialClipScene(**(fixed or {})).complete(rng, allow_held_out=allow_held_out)
        caption = clip_caption(random_partial_clip(rng, scene, drop_prob, drop_overrides))
        yield render_clip(scene, nrng), caption, scene


def all_clip_scenes(include_held_out: bool = True) -> list[ClipScene]:
    """Every distinct clip (a still shape once, not once per speed), in a fixed order."""
    scenes = [ClipScene(*combo) for combo in itertools.product(*CLIP_ATTRIBUTES.values())]
    scenes = [s for s in scenes if s.moving or s.speed == "slow"]
    return [s for s in scenes if include_held_out or not s.held_out]
