"""Perception for ShapesWorld clips: reads every clip attribute from 8 frames.

The image attributes (kind, colour, size, background) come from the shipped image perception
model run on every frame (frozen; per-frame log-probabilities averaged over the frames). Motion
(direction and speed) comes from a small conv net over the stacked frames plus coordinate
channels. Speed is trained and judged on moving clips only (a still shape has no speed).

Two jobs, like the image model: (a) the video fidelity judge (``predict``, ``log_prob_of``) and
(b) the video reward proxy's encoder (:class:`ClipPerceptionEncoder`: the frames' pooled image
embedding next to the motion embedding, differentiable in the frames).

    python -m rlr_core.shapesworld.clip_perception --steps 1500   # trains, writes models/clip-perception
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from rlr_core.feedback.protocols import FrozenModelEncoder
from rlr_core.shapesworld import clips
from rlr_core.shapesworld import perception as image_perception
from rlr_core.shapesworld.model import REPO_ROOT

DEFAULT_CLIP_PERCEPTION_DIR = REPO_ROOT / "models" / "clip-perception"
MOTION_DIM = 128
IMAGE_ATTRIBUTES = ("kind", "colour", "size", "background")  # read per frame by the image model
MOTION_ATTRIBUTES = ("direction", "speed")
EMBED_DIM = image_perception.EMBED_DIM + MOTION_DIM


class MotionNet(nn.Module):
    """Stacked frames (B, F, 3, 32, 32) plus coordinate channels -> a motion embedding and
    direction / speed logits. Coordinates let it read where the shape is in each frame."""

    def __init__(self, num_frames: int = clips.NUM_FRAMES, dim: int = MOTION_DIM):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.AvgPool2d(2))

        self.num_frames = num_frames
        self.encoder = nn.Sequential(
            block(3 * num_frames + 2, 32), block(32, 64), block(64, 64),  # 32 -> 16 -> 8 -> 4
            nn.Flatten(), nn.Linear(64 * 4 * 4, dim), nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(clips.CLIP_ATTRIBUTES[name]))
                                    for name in MOTION_ATTRIBUTES})
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[1] != self.num_frames:
            raise ValueError(f"the motion net reads clips of {self.num_frames} frames, not {frames.shape[1]}")
        x = (frames * 2 - 1).flatten(1, 2)
        return self.encoder(torch.cat([x, self.coords.expand(len(x), -1, -1, -1)], dim=1))


class ClipPerceptionNet(nn.Module):
    """Every clip attribute from clips (B, F, 3, 32, 32) in [0, 1]; differentiable in the frames."""

    def __init__(self, image: image_perception.PerceptionNet | None = None, num_frames: int = clips.NUM_FRAMES):
        super().__init__()
        self.image = image if image is not None else image_perception.PerceptionNet()
        self.motion = MotionNet(num_frames)

    @property
    def coords(self) -> torch.Tensor:  # where rlr_core.rewards looks for the judge's device
        return self.motion.coords

    @staticmethod
    def _fit(frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"expected clips (B, F, 3, H, W), got {tuple(frames.shape)}")
        if frames.shape[-2:] != (32, 32):  # e.g. clips from a larger model
            b = len(frames)
            frames = F.interpolate(frames.flatten(0, 1), size=(32, 32), mode="bilinear", antialias=True,
                                   align_corners=False).unflatten(0, (b, -1))
        return frames

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, EMBED_DIM): the frames' mean image embedding, then the motion embedding."""
        frames = self._fit(frames)
        per_frame = self.image.embed(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
        return torch.cat([per_frame.mean(1), self.motion.embed(frames)], dim=1)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per clip attribute. Image attributes: per-frame log-probabilities averaged over
        the middle half of the frames. The path is centred, so there the shape is in full view;
        at the ends a fast shape runs into the border, where the image model (trained on whole
        shapes) misreads kind and size (on fresh renders: 100% from the middle frames, 92% for
        size from all frames)."""
        frames = self._fit(frames)
        b, f = frames.shape[:2]
        lo, hi = f // 4, f - f // 4
        image_logits = self.image(frames[:, lo:hi].flatten(0, 1))
        out = {name: image_logits[name].log_softmax(-1).unflatten(0, (b, hi - lo)).mean(1)
               for name in IMAGE_ATTRIBUTES}
        z = self.motion.embed(frames)
        out.update({name: head(z) for name, head in self.motion.heads.items()})
        return out

    @torch.no_grad()
    def predict(self, frames: torch.Tensor) -> list[dict[str, str]]:
        """Each clip's attribute values (a still clip's speed is reported as "slow", as in
        :class:`~rlr_core.shapesworld.clips.ClipScene`)."""
        idx = {name: lg.argmax(-1).tolist() for name, lg in self(frames).items()}
        preds = []
        for i in range(len(frames)):
            pred = {name: clips.CLIP_ATTRIBUTES[name][idx[name][i]] for name in clips.CLIP_ATTRIBUTES}
            if pred["direction"] == "still":
                pred["speed"] = "slow"
            preds.append(pred)
        return preds

    def log_prob_of(self, frames: torch.Tensor,
                    scenes: list[clips.PartialClipScene | clips.ClipScene]) -> torch.Tensor:
        """Sum over the attributes each scene names of log p(value | clip); a speed counts only
        with a moving direction (or none named). Differentiable in the frames."""
        logits = self(frames)
        total = torch.zeros(len(frames), device=frames.device)
        for name, values in clips.CLIP_ATTRIBUTES.items():
            logp = logits[name].log_softmax(-1)
            for i, scene in enumerate(scenes):
                value = getattr(scene, name)
                if value is None or (name == "speed" and scene.direction == "still"):
                    continue
                total[i] = total[i] + logp[i, values.index(value)]
        return total


class ClipPerceptionEncoder(FrozenModelEncoder):
    """The clip perception embedding as the reward proxy's encoder (the ``ImageEncoder`` protocol
    of rlr_core.feedback.protocols, but on clips (B, F, 3, H, W) in [0, 1])."""

    name = "shapesworld-clip-perception"
    spec = "clip-perception"
    dim = EMBED_DIM

    def __init__(self, model: ClipPerceptionNet | None = None):
        self.model = model if model is not None else load()
        self.model.eval().requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images.to(self.model.coords.device)).to(images.device)


# ----------------------------------------------------------------------------- data and training
def render_clips(scenes: list[clips.ClipScene], rng: np.random.Generator) -> torch.Tensor:
    """(N, F, 3, 32, 32) renders of ``scenes``."""
    return torch.from_numpy(np.stack([clips.render_clip(s, rng) for s in scenes])).permute(0, 1, 4, 2, 3)


def random_scenes(pyrng: random.Random, n: int) -> list[clips.ClipScene]:
    return [clips.PartialClipScene().complete(pyrng) for _ in range(n)]


def labels_of(scenes: list[clips.ClipScene]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes])
            for name, values in clips.CLIP_ATTRIBUTES.items()}


# The dihedral symmetries of the square act on the clip and its direction together: eight
# labelled clips from one render (the training pool is rendered once: rendering is the slow part).
_FLIP_X = {"right": "left", "left": "right"}
_FLIP_Y = {"up": "down", "down": "up"}
_TRANSPOSE = {"right": "down", "down": "right", "left": "up", "up": "left"}


def symmetry(frames: torch.Tensor, direction: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips / transposes of clips (B, F, 3, H, W) with their direction labels."""
    names = clips.CLIP_ATTRIBUTES["direction"]
    direction = direction.clone()
    for table, op in ((_TRANSPOSE, lambda x: x.transpose(-1, -2)), (_FLIP_X, lambda x: x.flip(-1)),
                      (_FLIP_Y, lambda x: x.flip(-2))):
        pick = torch.rand(len(frames), generator=gen) < 0.5
        frames = torch.where(pick[:, None, None, None, None], op(frames), frames)
        mapped = torch.tensor([names.index(table.get(names[d], names[d])) for d in direction.tolist()])
        direction = torch.where(pick, mapped, direction)
    return frames, direction


def augment(frames: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generated clips are noisier and blurrier than renders (as for the image model), with some
    flicker from frame to frame."""
    b, f = frames.shape[:2]
    flat = image_perception.augment(frames.flatten(0, 1), gen).unflatten(0, (b, f))
    flicker = (torch.rand(b, f, 1, 1, 1, generator=gen) - 0.5) * 0.06
    return (flat + flicker).clamp(0, 1)


def accuracy(model: ClipPerceptionNet, n: int = 1000, seed: int = 12345, batch: int = 250) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh renders (held-out pairs included); speed over the
    moving clips only."""
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    correct = {name: 0 for name in clips.CLIP_ATTRIBUTES}
    moving = 0
    model.eval()
    for start in range(0, n, batch):
        scenes = random_scenes(pyrng, min(batch, n - start))
        for pred, scene in zip(model.predict(render_clips(scenes, rng)), scenes):
            for name in clips.CLIP_ATTRIBUTES:
                if name == "speed" and not scene.moving:
                    continue
                correct[name] += pred[name] == getattr(scene, name)
            moving += scene.moving
    return {name: c / (moving if name == "speed" else n) for name, c in correct.items()}


def train(steps: int, batch: int = 64, pool: int = 2048, lr: float = 2e-3, seed: int = 0,
          image: image_perception.PerceptionNet | None = None) -> tuple[ClipPerceptionNet, list[float]]:
    """Train the motion net (the image model stays frozen) on a pool of renders, each seen under
    random symmetries and augmentation."""
    torch.manual_seed(seed)
    model = ClipPerceptionNet(image if image is not None else image_perception.load())
    model.image.eval().requires_grad_(False)
    rng, pyrng, gen = np.random.default_rng(seed), random.Random(seed), torch.Generator().manual_seed(seed)
    scenes = random_scenes(pyrng, pool)
    data = torch.cat([render_clips(scenes[i:i + 64], rng)
                      for i in tqdm(range(0, pool, 64), desc="rendering clips")])
    labels = labels_of(scenes)
    opt = torch.optim.AdamW(model.motion.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.motion.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc="clip perception")):
        idx = torch.randint(0, pool, (batch,), generator=gen)
        frames, direction = symmetry(data[idx], labels["direction"][idx], gen)
        z = model.motion.embed(augment(frames, gen))
        loss = F.cross_entropy(model.motion.heads["direction"](z), direction)
        moving = direction != clips.CLIP_ATTRIBUTES["direction"].index("still")
        if moving.any():  # speed only where there is motion
            loss = loss + F.cross_entropy(model.motion.heads["speed"](z[moving]), labels["speed"][idx][moving])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return model, losses


def load(path: str | Path = DEFAULT_CLIP_PERCEPTION_DIR, device: str | torch.device = "cpu") -> ClipPerceptionNet:
    """The frozen clip perception model (eval mode, no gradients to its weights)."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"no clip perception model at {path}; train one with "
                                "`python -m rlr_core.shapesworld.clip_perception`")
    card = json.loads((path / "card.json").read_text()) if (path / "card.json").exists() else {}
    model = ClipPerceptionNet(num_frames=int(card.get("num_frames", clips.NUM_FRAMES)))
    return image_perception.load_frozen(model, path, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the ShapesWorld clip perception model (motion head).")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pool", type=int, default=2048, help="clips rendered once and reused under symmetries")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-clips", type=int, default=1000)
    p.add_argument("--out", type=Path, default=DEFAULT_CLIP_PERCEPTION_DIR)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, losses = train(args.steps, args.batch, args.pool, seed=args.seed)
    acc = accuracy(model, args.eval_clips)
    print("accuracy on fresh renders:", json.dumps(acc))
    n_params = sum(p.numel() for p in model.motion.parameters())
    card = {"steps": args.steps, "batch": args.batch, "pool": args.pool, "seed": args.seed,
            "num_frames": model.motion.num_frames, "final_loss": float(np.mean(losses[-50:])),
            "accuracy_fresh_renders": acc, "eval_clips": args.eval_clips,
            "speed_judged_on": "moving clips only", "embed_dim": EMBED_DIM,
            "motion_parameters": n_params,
            "image_model": "models/perception, frozen (its weights are copied into model.safetensors)",
            "image_attributes_read_from": "the middle half of the frames"}
    image_perception.save(model, args.out, card)


if __name__ == "__main__":
    main()
