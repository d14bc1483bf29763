"""ShapesWorld: a procedural world of captioned 32x32 images.

One scene is one shape (kind, colour, size, position) on a plain background. Scenes are
rendered at 4x resolution and box-downsampled (anti-aliased edges), with jitter in position,
size and colour so that images of one caption differ. Captions come from a small grammar and
may leave attributes out ("a red circle"); unspecified attributes then vary.

Some (colour, kind) combinations never appear in training data (``HELD_OUT_PAIRS``): the
fidelity benchmark uses them to measure whether the model composes attributes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

KINDS: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.92, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "purple": (0.60, 0.20, 0.80),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "navy": (0.08, 0.10, 0.35),
}
SIZES: dict[str, float] = {"small": 4.5, "large": 8.5}  # half-extent in pixels
POSITIONS: dict[str, float] = {"left": 9.0, "center": 16.0, "right": 23.0}  # x of the centre

# Attribute order used by the perception model and the fidelity benchmark.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

# (colour, kind) pairs never rendered for training: held out to test composition.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
)

_POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}


@dataclasses.dataclass(frozen=True)
class Scene:
    """A fully specified scene: every attribute has a value."""

    kind: str
    colour: str
    size: str
    position: str
    background: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.kind) in HELD_OUT_PAIRS


@dataclasses.dataclass(frozen=True)
class PartialScene:
    """What a caption specifies; ``None`` means the caption leaves the attribute open."""

    kind: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None

    def specified(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def complete(self, rng: random.Random, allow_held_out: bool = True) -> Scene:
        """Fill the open attributes at random (never creating a held-out pair unless allowed)."""
        for _ in range(1000):
            values = {
                name: getattr(self, name) or rng.choice(options)
                for name, options in ATTRIBUTES.items()
            }
            scene = Scene(**values)
            if allow_held_out or not scene.held_out:
                return scene
        raise ValueError(f"cannot complete {self} without a held-out pair")


def caption(scene: Scene | PartialScene) -> str:
    """The grammar: 'a [size] [colour] [kind|shape] [position][, background background]'."""
    words = ["a"]
    if scene.size:
        words.append(scene.size)
    if scene.colour:
        words.append(scene.colour)
    words.append(scene.kind or "shape")
    if scene.position:
        words.append(_POSITION_PHRASE[scene.position])
    text = " ".join(words)
    if scene.background:
        text += f", {scene.background} background"
    return text


def parse_caption(text: str) -> PartialScene:
    """Inverse of :func:`caption` for any prompt made of known attribute words.

    Attribute words are picked out wherever they stand, so a user's word order is free;
    a background colour is the colour word directly before 'background'.
    """
    words = text.lower().replace(",", " , ").split()
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if nxt == "background" and (word in BACKGROUNDS or word in COLOURS):
            found["background"] = word
        elif word in COLOURS:
            found["colour"] = word
        elif word in KINDS:
            found["kind"] = word
        elif word in SIZES:
            found["size"] = word
        elif word in POSITIONS:
            found["position"] = word
    return PartialScene(**found)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a scene to a float32 array (32, 32, 3) in [0, 1], with jitter from ``rng``."""
    rng = rng or np.random.default_rng()
    bg = np.clip(np.array(BACKGROUNDS[scene.background]) + rng.normal(0, 0.02, 3), 0, 1)
    fg = np.clip(np.array(COLOURS[scene.colour]) + rng.normal(0, 0.03, 3), 0, 1)
    cx = POSITIONS[scene.position] + rng.uniform(-1.5, 1.5)
    cy = 16.0 + rng.uniform(-2.0, 2.0)
    r = SIZES[scene.size] * rng.uniform(0.9, 1.1)

    alpha = shape_mask(scene.kind, cx, cy, r)
    image = alpha * fg + (1 - alpha) * bg
    image += rng.normal(0, 0.01, image.shape)  # faint texture so no two renders are equal
    return np.clip(image, 0, 1).astype(np.float32)


def shape_mask(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Coverage (32, 32, 1) in [0, 1] of a shape centred at (cx, cy) with half-extent r,
    drawn at 4x and box-downsampled (anti-aliased edges)."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        q = r * 0.85  # a square of equal half-extent looks bigger than the circle
        draw.rectangle([(cx - q) * s, (cy - q) * s, (cx + q) * s, (cy + q) * s], fill=255)
    elif kind == "triangle":
        pts = [(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)]
        draw.polygon([(x * s, y * s) for x, y in pts], fill=255)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    mask = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def random_partial(rng: random.Random, scene: Scene, drop_prob: float,
                   drop_overrides: dict[str, float] | None = None) -> PartialScene:
    """Forget each attribute of ``scene`` with probability ``drop_prob`` (varied captions);
    ``drop_overrides`` gives some attributes their own probability."""
    probs = drop_overrides or {}
    kept = {k: v for k, v in scene.as_dict().items() if rng.random() >= probs.get(k, drop_prob)}
    return PartialScene(**kept)


def training_examples(
    seed: int, drop_prob: float = 0.3, allow_held_out: bool = False,
    drop_overrides: dict[str, float] | None = None, fixed: dict[str, str] | None = None,
) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """An endless stream of (image, caption, scene); captions omit attributes at random.
    ``fixed`` pins attributes of every scene (a curriculum's narrow first stages)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    while True:
        scene = PartialScene(**(fixed or {})).complete(rng, allow_held_out=allow_held_out)
        yield render(scene, nrng), caption(random_partial(rng, scene, drop_prob, drop_overrides)), scene


def all_scenes(include_held_out: bool = True) -> list[Scene]:
    """Every combination of attributes, in a fixed order."""
    import itertools

    scenes = [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]
    return [s for s in scenes if include_held_out or not s.held_out]
