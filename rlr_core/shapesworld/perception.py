"""The ShapesWorld perception model: a small CNN that reads every attribute of an image.

Two jobs: (a) the fidelity evaluator (which attributes of a generated image match its
prompt) and (b) a frozen, differentiable image encoder whose embeddings the reward proxy
uses (the built-in counterpart of CLIP image features). Trained on fresh renders only.

    python -m rlr_core.shapesworld.perception --steps 3000   # trains and writes models/perception
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.model import REPO_ROOT

DEFAULT_PERCEPTION_DIR = REPO_ROOT / "models" / "perception"
ModuleT = TypeVar("ModuleT", bound=nn.Module)
EMBED_DIM = 128


class PerceptionNet(nn.Module):
    """Conv encoder -> embedding (EMBED_DIM) -> one linear head per attribute.

    Input: images (B, 3, 32, 32) in [0, 1]. Everything is differentiable in the input.
    """

    def __init__(self, embed_dim: int = EMBED_DIM):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            )

        # Coordinate channels let the net read position directly.
        self.encoder = nn.Sequential(
            block(5, 24), nn.AvgPool2d(2), block(24, 48), nn.AvgPool2d(2), block(48, 64),
            nn.Flatten(), nn.Linear(64 * 8 * 8, embed_dim), nn.SiLU(),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(embed_dim, len(values)) for name, values in sw.ATTRIBUTES.items()}
        )
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        x = torch.cat([x, self.coords.expand(len(x), -1, -1, -1)], dim=1)
        return self.encoder(x)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.embed(images)
        return {name: head(z) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        logits = self(images)
        idx = {name: lg.argmax(-1).tolist() for name, lg in logits.items()}
        return [
            {name: sw.ATTRIBUTES[name][idx[name][i]] for name in sw.ATTRIBUTES}
            for i in range(len(images))
        ]

    def log_prob_of(self, images: torch.Tensor, scenes: list[sw.PartialScene]) -> torch.Tensor:
        """Sum over specified attributes of log p(attribute value | image): a differentiable
        'does the image show what the prompt asked' score, one per image."""
        logits = self(images)
        total = torch.zeros(len(images), device=images.device)
        for name, values in sw.ATTRIBUTES.items():
            logp = logits[name].log_softmax(-1)
            for i, scene in enumerate(scenes):
                value = getattr(scene, name)
                if value is not None:
                    total[i] = total[i] + logp[i, values.index(value)]
        return total


def render_batch(rng: np.random.Generator, pyrng, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [sw.PartialScene().complete(pyrng) for _ in range(n)]
    images = torch.from_numpy(np.stack([sw.render(s, rng) for s in scenes])).permute(0, 3, 1, 2)
    labels = {
        name: torch.tensor([values.index(getattr(s, name)) for s in scenes])
        for name, values in sw.ATTRIBUTES.items()
    }
    return images, labels


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generated images are noisier and blurrier than renders: train on a little of both."""
    noise_level = torch.rand(len(images), 1, 1, 1, generator=gen) * 0.08
    images = images + noise_level * torch.randn(images.shape, generator=gen)
    blur = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    mix = (torch.rand(len(images), 1, 1, 1, generator=gen) < 0.3).float() * 0.5
    return (images * (1 - mix) + blur * mix).clamp(0, 1)


def accuracy(model: PerceptionNet, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh renders (all combinations, held-out included)."""
    import random

    images, labels = render_batch(np.random.default_rng(seed), random.Random(seed), n)
    model.eval()
    correct = {name: 0 for name in sw.ATTRIBUTES}
    with torch.no_grad():
        for start in range(0, n, 500):
            logits = model(images[start:start + 500])
            for name in sw.ATTRIBUTES:
                pred = logits[name].argmax(-1)
                correct[name] += (pred == labels[name][start:start + 500]).sum().item()
    return {name: c / n for name, c in correct.items()}


def save(model: nn.Module, path: str | Path, card: dict) -> None:
    """A model folder (this one's, or the presence or clip perception model's): its weights
    (``model.safetensors``) and its card (``card.json``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), path / "model.safetensors")
    (path / "card.json").write_text(json.dumps(card, indent=2))


def load_frozen(model: ModuleT, path: str | Path, device: str | torch.device = "cpu") -> ModuleT:
    """``model`` with the weights of the folder ``path`` (see :func:`save`), frozen: eval mode, no
    gradients to its weights."""
    model.load_state_dict(load_file(Path(path) / "model.safetensors"))
    model.eval().requires_grad_(False)
    return model.to(device)


def load(path: str | Path = DEFAULT_PERCEPTION_DIR, device: str | torch.device = "cpu") -> PerceptionNet:
    """The frozen perception model (eval mode, no gradients to its weights)."""
    return load_frozen(PerceptionNet(), path, device)


def train(steps: int, batch: int = 128, lr: float = 2e-3, seed: int = 0) -> tuple[PerceptionNet, list[float]]:
    import random

    torch.manual_seed(seed)
    model = PerceptionNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng, pyrng, gen = np.random.default_rng(seed), random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    for _ in (bar := tqdm(range(steps), desc="perception")):
        images, labels = render_batch(rng, pyrng, batch)
        logits = model(augment(images, gen))
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k]) for k in labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model, losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the ShapesWorld perception model.")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_PERCEPTION_DIR)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, losses = train(args.steps, args.batch, seed=args.seed)
    acc = accuracy(model)
    print("accuracy on fresh renders:", json.dumps(acc))
    save(model, args.out, {"steps": args.steps, "batch": args.batch, "seed": args.seed,
                           "final_loss": float(np.mean(losses[-50:])), "accuracy_fresh_renders": acc,
                           "embed_dim": EMBED_DIM})


if __name__ == "__main__":
    main()
