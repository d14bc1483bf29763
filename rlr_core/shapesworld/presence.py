"""Does the image show a shape at all? A small CNN that tells a shape of the world's sizes from a
speck or an empty background.

The perception model was trained on renders only, and every render has a shape of the world's
sizes, so it reads *some* kind, size and position from any image: a round that shrinks shapes to
specks of a few pixels still reads as "a small circle on the left" to it. This model is what the
built-in fidelity judge asks first: an attribute of the shape counts as shown only when a shape
is (``rlr_core/fidelity.py``).

It starts from the perception model's encoder (so it reads generated images as well as that
does) and learns one logit from fresh images of two kinds: renders whose shape has the world's
sizes (half-extent 0.85-1.2 x 4.5 or 8.5 px, positions a little wider than the renderer's), and
images of a speck (half-extent 0.4-2.4 px, anywhere) or of the background alone. The two size
ranges leave a gap (2.4-3.8 px), so the model is never taught an arbitrary line between them.
The perception model itself, the reward proxy's features and the simulated raters are unchanged.

    python -m rlr_core.shapesworld.presence --steps 400   # trains and writes models/presence
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rlr_core.shapesworld import perception
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.model import REPO_ROOT

DEFAULT_PRESENCE_DIR = REPO_ROOT / "models" / "presence"
SHAPE_SCALE = (0.85, 1.2)  # x the world's half-extent (the renderer jitters 0.9-1.1)
SPECK_HALF_EXTENT = (0.4, 2.4)  # pixels; the smallest shape of the world is ~3.8 (4.5 x 0.85)
EMPTY_SHARE = 0.15  # of the negatives: the background alone


class PresenceNet(nn.Module):
    """The perception model's encoder and one linear head: logit of "a shape of the world's sizes
    is shown". Input (B, 3, 32, 32) in [0, 1]; differentiable in the input."""

    def __init__(self, encoder: perception.PerceptionNet | None = None):
        super().__init__()
        self.body = encoder if encoder is not None else perception.PerceptionNet()
        self.body.heads = nn.ModuleDict()  # the attribute heads are the perception model's job
        self.head = nn.Linear(perception.EMBED_DIM, 1)

    @property
    def coords(self) -> torch.Tensor:  # the device the model is on, as the judges ask for it
        return self.body.coords

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body.embed(images))[:, 0]

    def probability(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).sigmoid()


def _image(rng: np.random.Generator, scene: sw.Scene, half_extent: float, cx: float, cy: float) -> np.ndarray:
    """``scene``'s background and colour with a shape of ``half_extent`` at (cx, cy); none for 0."""
    bg = np.clip(np.array(sw.BACKGROUNDS[scene.background]) + rng.normal(0, 0.02, 3), 0, 1)
    image = np.broadcast_to(bg, (sw.IMAGE_SIZE, sw.IMAGE_SIZE, 3)).copy()
    if half_extent > 0:
        fg = np.clip(np.array(sw.COLOURS[scene.colour]) + rng.normal(0, 0.03, 3), 0, 1)
        alpha = sw.shape_mask(scene.kind, cx, cy, half_extent)
        image = alpha * fg + (1 - alpha) * image
    image += rng.normal(0, 0.01, image.shape)  # the renderer's faint texture
    return np.clip(image, 0, 1).astype(np.float32)


def training_batch(rng: np.random.Generator, pyrng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images, half with a shape of the world's sizes (label 1), half a speck or nothing (0)."""
    images, labels = [], []
    for i in range(n):
        scene = sw.PartialScene().complete(pyrng)
        if i % 2 == 0:
            half_extent = sw.SIZES[scene.size] * rng.uniform(*SHAPE_SCALE)
            cx, cy = sw.POSITIONS[scene.position] + rng.uniform(-2.5, 2.5), 16.0 + rng.uniform(-3.0, 3.0)
        else:
            half_extent = 0.0 if rng.random() < EMPTY_SHARE else rng.uniform(*SPECK_HALF_EXTENT)
            cx, cy = rng.uniform(3, 29), rng.uniform(3, 29)
        images.append(_image(rng, scene, half_extent, cx, cy))
        labels.append(float(i % 2 == 0))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels)


def accuracy(model: PresenceNet, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """On ``n`` fresh images: the share of shapes read as shown and of specks/empties read as not."""
    images, labels = training_batch(np.random.default_rng(seed), random.Random(seed), n)
    model.eval()
    with torch.no_grad():
        shown = torch.cat([model.probability(images[i:i + 500]) for i in range(0, n, 500)]) >= 0.5
    return {"shapes_shown": float(shown[labels == 1].float().mean()),
            "specks_or_empty_not_shown": float((~shown[labels == 0]).float().mean())}


def train(steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0,
          start: perception.PerceptionNet | None = None) -> tuple[PresenceNet, list[float]]:
    """Fine-tune a copy of the perception encoder (``start``, the shipped one by default) with a new head."""
    torch.manual_seed(seed)
    encoder = start if start is not None else perception.load()
    model = PresenceNet(encoder.requires_grad_(True).train())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng, pyrng, gen = np.random.default_rng(seed), random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    for _ in (bar := tqdm(range(steps), desc="presence")):
        images, labels = training_batch(rng, pyrng, batch)
        loss = nn.functional.binary_cross_entropy_with_logits(model(perception.augment(images, gen)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval(), losses


def load(path: str | Path = DEFAULT_PRESENCE_DIR, device: str | torch.device = "cpu") -> PresenceNet:
    """The frozen presence model (eval mode, no gradients to its weights)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no presence model at {path}; "
                                "train one with `python -m rlr_core.shapesworld.presence`")
    return perception.load_frozen(PresenceNet(), path, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the ShapesWorld presence model (a shape, or a speck/nothing).")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_PRESENCE_DIR)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, losses = train(args.steps, args.batch, seed=args.seed)
    acc = accuracy(model)
    print("on fresh images:", json.dumps(acc))
    perception.save(model, args.out, {"steps": args.steps, "batch": args.batch, "seed": args.seed,
                                      "start": "models/perception (its encoder, fine-tuned)",
                                      "final_loss": float(np.mean(losses[-50:])), "accuracy_fresh_images": acc,
                                      "shape_scale": SHAPE_SCALE, "speck_half_extent": SPECK_HALF_EXTENT})


if __name__ == "__main__":
    main()
