"""How fast and which way the clip model's shapes move, measured from pixels.

    PYTHONPATH=. python scripts/clip_motion_probe.py runs/clips/checkpoint [--seed 0] [--samples N]
    PYTHONPATH=. python scripts/clip_motion_probe.py models/shapesworld-clips

Loads a pretraining checkpoint's EMA weights (rlr_core/shapesworld/pretrain_clips.py) or a clip
model folder, draws one
large red circle on black per direction and speed (20 steps, guidance 3), and prints the mean
frame-to-frame step of the shape's centroid (pixels far from the border colour). The grammar's
targets: right (+v, 0), left (-v, 0), up (0, -v), down (0, +v), still (0, 0) with v = 1 (slow)
or 2.25 (fast) pixels per frame. A monitor for pretraining, independent of the perception model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from rlr_core.backends.builtin_clips import BuiltinClipBackend
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import clips, video_model
from rlr_core.shapesworld import model as image_model
from rlr_core.shapesworld.pretrain_clips import freeze_for_training, trainable_modules


def centroid_steps(clip: np.ndarray) -> np.ndarray:
    """Mean (dx, dy) per frame of the foreground centroid; clip (F, H, W, 3) in [0, 1]."""
    points = []
    for frame in clip:
        border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).mean(0)
        ys, xs = np.nonzero(np.abs(frame - border).sum(-1) > 0.3)
        points.append((xs.mean(), ys.mean()) if len(xs) else (np.nan, np.nan))
    return np.nanmean(np.diff(np.array(points), axis=0), axis=0)


def load_checkpoint(checkpoint: Path, init: Path) -> video_model.ClipModel:
    """A clip model with a pretraining checkpoint's EMA weights."""
    train_unet = bool(json.loads((checkpoint / "state.json").read_text())["args"].get("train_unet"))
    model = video_model.from_image_model(image_model.load_model(init))
    if not any(k.startswith("trajectory_head.") for k in load_file(checkpoint / "model.safetensors")):
        model.denoiser.trajectory_head = None  # a stage trained without the head
    freeze_for_training(model, train_unet)
    params = [q for q in trainable_modules(model, train_unet).parameters() if q.requires_grad]
    shadow = load_file(checkpoint / "ema.safetensors")
    with torch.no_grad():
        for i, param in enumerate(params):
            param.copy_(shadow[f"p{i}"])
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a pretraining checkpoint folder, or a clip model folder")
    p.add_argument("--init", type=Path, default=image_model.DEFAULT_MODEL_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="clips per case (seeds seed, seed+1, ...)")
    args = p.parse_args()
    if video_model.is_clip_model_folder(args.checkpoint):
        model = video_model.load_clip_model(args.checkpoint)
    else:
        model = load_checkpoint(args.checkpoint, args.init)
    model.denoiser.eval()
    cases = [(d, s) for d in clips.DIRECTIONS for s in clips.SPEEDS if d != "still" or s == "slow"]
    prompts = [clips.clip_caption(clips.ClipScene("circle", "red", "large", d, s, "black")) for d, s in cases]
    backend = BuiltinClipBackend(model)
    draws = [generate(backend, prompts, SamplerSettings(steps=20, guidance=3.0), seed=args.seed + i)
             .permute(0, 1, 3, 4, 2).numpy() for i in range(args.samples)]
    for c, (direction, speed) in enumerate(cases):
        want = np.array(clips.DIRECTIONS[direction]) * clips.SPEEDS[speed]
        steps = np.array([centroid_steps(d[c]) for d in draws])
        got = np.nanmean(steps, axis=0)
        # a clip moves the right way when its step along the wanted axis has the wanted sign and
        # is larger than the step across it
        right_way = [bool(np.dot(s, want) > 0 and abs(np.dot(s, want)) > abs(np.cross(s, want)))
                     for s in steps] if direction != "still" else [bool(np.hypot(*s) < 0.5) for s in steps]
        print(f"{direction:6s} {speed:5s} want ({want[0]:+.2f}, {want[1]:+.2f})  got ({got[0]:+.2f}, {got[1]:+.2f})"
              f"  right way {sum(right_way)}/{len(right_way)}")


if __name__ == "__main__":
    main()
