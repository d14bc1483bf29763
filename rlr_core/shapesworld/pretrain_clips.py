"""Pretrain the built-in clip model: motion modules on top of the image model.

    python -m rlr_core.shapesworld.pretrain_clips --out runs/clips [--resume] [--steps N] \
        [--export models/shapesworld-clips]

What trains: the motion adapter (new, zero-output at the start), the trajectory head (the
velocity a caption asks for; rlr_core/shapesworld/trajectory.py), the text encoder (it gains the
clip grammar's words: moving, slowly, fast, up, down, ...) and the image UNet's pooled-caption
embedding (so every ResNet block sees the motion words). The denoiser is trained with each clip's
true velocity (so it learns to draw a scene at rest in the shape's frame of reference), and the
head learns to read that velocity from captions, on a larger batch of captions per step (they
cost nothing to make). The image UNet's other layers stay
frozen (``--train-unet`` unfreezes them): the image model already draws the shapes, and the
clip model inherits its fidelity. The recipe is the image model's (v-prediction, the same
loss weights, AdamW with warm-up, EMA; see rlr_core/shapesworld/pretrain.py), with a share of
the timesteps drawn at high noise, where a sample's layout, and so its motion, is decided.
Clips are rendered on the fly. Checkpoints (safetensors) and a strip of sample clips are written
every ``--every`` steps; ``--resume`` continues from the latest.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rlr_core.backends.builtin_clips import BuiltinClipBackend
from rlr_core.images import to_pil
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import clips, video_model
from rlr_core.shapesworld import model as image_model
from rlr_core.shapesworld.pretrain import loss_weights, sample_timesteps
from rlr_core.shapesworld.video_model import ClipModel

STRIP_PROMPTS = [
    "a large red circle moving fast to the right, black background",
    "a small blue square moving slowly to the left, white background",
    "a large yellow triangle moving fast up, navy background",
    "a large green circle moving slowly down, gray background",
    "a large purple square standing still, black background",
    "a small orange triangle moving fast to the left, gray background",
]


def clip_batches(seed: int, batch: int, start_step: int, fixed: dict[str, str] | None = None,
                 drop_overrides: dict[str, float] | None = None):
    """Batches of (clips (B, F, 3, H, W) in [-1, 1], captions, velocities (B, 2)); skips
    ``start_step`` batches on resume."""
    stream = clips.training_clips(seed, fixed=fixed, drop_overrides=drop_overrides)
    for _ in range(start_step * batch):
        next(stream)
    while True:
        items = [next(stream) for _ in range(batch)]
        frames = torch.from_numpy(np.stack([clip for clip, _, _ in items])).permute(0, 1, 4, 2, 3)
        yield frames * 2 - 1, [cap for _, cap, _ in items], clip_velocities([scene for _, _, scene in items])


def clip_velocities(scenes: list[clips.ClipScene]) -> torch.Tensor:
    """Each scene's velocity (dx, dy) in pixels per frame, (B, 2)."""
    return torch.tensor([[c * clips.SPEEDS[s.speed] for c in clips.DIRECTIONS[s.direction]] for s in scenes])


def caption_batches(seed: int, batch: int, start_step: int):
    """Batches of (captions, velocities) for the trajectory head: captions drop attributes as the
    clips' do, so a caption without a direction is read as the mean velocity (at rest). Skips
    ``start_step`` batches on resume."""
    rng = random.Random(seed + 1)
    scenes = clips.all_clip_scenes(include_held_out=False)

    def draw():
        drawn = [rng.choice(scenes) for _ in range(batch)]
        return [clips.clip_caption(clips.random_partial_clip(rng, s, 0.3)) for s in drawn], clip_velocities(drawn)

    for _ in range(start_step):
        draw()
    while True:
        yield draw()


def trainable_modules(model: ClipModel, train_unet: bool) -> torch.nn.ModuleDict:
    parts = {"motion_adapter": model.denoiser.motion_adapter, "text_encoder": model.text_encoder}
    if model.denoiser.trajectory_head is not None:
        parts["trajectory_head"] = model.denoiser.trajectory_head
    parts["unet"] = model.denoiser.unet if train_unet else model.denoiser.unet.add_embedding
    return torch.nn.ModuleDict(parts)


def freeze_for_training(model: ClipModel, train_unet: bool) -> None:
    model.denoiser.unet.requires_grad_(train_unet)
    model.denoiser.unet.add_embedding.requires_grad_(True)
    model.denoiser.motion_adapter.requires_grad_(True)
    if model.denoiser.trajectory_head is not None:
        model.denoiser.trajectory_head.requires_grad_(True)
    model.text_encoder.requires_grad_(True)


def write_strip(model: ClipModel, path: Path, seed: int = 0, steps: int = 20) -> None:
    """One row of frames per prompt of STRIP_PROMPTS."""
    model.denoiser.eval()
    clips_ = generate(BuiltinClipBackend(model), STRIP_PROMPTS, SamplerSettings(steps=steps, guidance=3.0), seed=seed)
    tile = 64
    strip = Image.new("RGB", (tile * clips.NUM_FRAMES, tile * len(STRIP_PROMPTS)), "white")
    for row, clip in enumerate(clips_):
        for col, frame in enumerate(clip):
            strip.paste(to_pil(frame, scale=2), (col * tile, row * tile))
    strip.save(path)


def save_checkpoint(out: Path, modules: torch.nn.ModuleDict, ema: EMAModel, opt, step: int, run_args: dict) -> None:
    tmp, ckpt = out / "checkpoint.tmp", out / "checkpoint"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, tmp / "model.safetensors")
    save_file({f"p{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)}, tmp / "ema.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors only: loaded weights_only
    meta = {"step": step, "ema_optimization_step": ema.optimization_step, "args": run_args}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    if ckpt.exists():
        ckpt.rename(out / f"checkpoint.old{step}")
    tmp.rename(ckpt)
    for old in out.glob("checkpoint.old*"):  # keep only the newest complete checkpoint
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def ema_copy(model: ClipModel, ema: EMAModel, train_unet: bool) -> ClipModel:
    import copy

    out = copy.deepcopy(model)
    ema.copy_to(trainable_modules(out, train_unet).parameters())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/clips"))
    p.add_argument("--init", type=Path, default=image_model.DEFAULT_MODEL_DIR,
                   help="the image model folder the clip model starts from")
    p.add_argument("--steps", type=int, default=3000, help="stop after this many steps in all")
    p.add_argument("--batch", type=int, default=6, help="clips per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--every", type=int, default=200, help="checkpoint and strip interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--strip-steps", type=int, default=20, help="sampling steps of the sample strips")
    p.add_argument("--high-noise-frac", type=float, default=0.3)
    p.add_argument("--high-noise-min", type=int, default=900)
    p.add_argument("--train-unet", action="store_true", help="fine-tune the image layers too")
    p.add_argument("--no-trajectory-head", action="store_true",
                   help="no trajectory head: motion left to the temporal layers (how stage 0 was trained)")
    p.add_argument("--caption-batch", type=int, default=64, help="captions per step for the trajectory head")
    p.add_argument("--head-lr-scale", type=float, default=10.0, help="the trajectory head's learning rate / --lr")
    p.add_argument("--velocity-weight", type=float, default=0.1, help="weight of the trajectory head's loss")
    p.add_argument("--fix", nargs="+", default=[], metavar="ATTR=VALUE",
                   help="render only clips with these attributes (curriculum stages), e.g. background=black")
    p.add_argument("--always-name", nargs="+", default=[], metavar="ATTR",
                   help="never drop these attributes from captions (curriculum stages), e.g. direction speed")
    p.add_argument("--init-checkpoint", type=Path, default=None,
                   help="start from another run's checkpoint (fresh optimiser and EMA): the next curriculum stage")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", type=Path, default=None, help="write the EMA model folder here at the end")
    p.add_argument("--fit-head", type=int, default=0, metavar="STEPS",
                   help="with --export: refit the trajectory head to the final text encoder for this many steps")
    p.add_argument("--export-only", action="store_true", help="with --resume: export the checkpoint and exit")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    run_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    model = video_model.from_image_model(image_model.load_model(args.init), seed=args.seed)
    ckpt = args.out / "checkpoint"
    start = 0
    if args.resume and ckpt.exists():
        meta = json.loads((ckpt / "state.json").read_text())
        run_args = meta["args"]  # the recipe is the run's, not this command line's
        args.train_unet = bool(run_args.get("train_unet", False))
        args.no_trajectory_head = bool(run_args.get("no_trajectory_head", False))
    if args.no_trajectory_head:
        model.denoiser.trajectory_head = None
    freeze_for_training(model, args.train_unet)
    modules = trainable_modules(model, args.train_unet)
    params = [q for q in modules.parameters() if q.requires_grad]
    # The trajectory head is a small regression from scratch: it learns at a higher rate.
    head = model.denoiser.trajectory_head
    head_ids = {id(q) for q in head.parameters()} if head is not None else set()
    opt = torch.optim.AdamW([{"params": [q for q in params if id(q) not in head_ids], "scale": 1.0},
                             {"params": [q for q in params if id(q) in head_ids], "scale": args.head_lr_scale}],
                            lr=args.lr, weight_decay=0.01)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    if args.init_checkpoint and not (args.resume and ckpt.exists()):
        state = load_file(args.init_checkpoint / "model.safetensors")
        init_args = json.loads((args.init_checkpoint / "state.json").read_text())["args"]
        if args.train_unet and not init_args.get("train_unet"):
            # That run trained only the UNet's pooled-caption embedding: it loads into the
            # whole UNet (whose other layers are the image model's) under its own name.
            state = {k.replace("unet.", "unet.add_embedding.", 1) if k.startswith("unet.") else k: v
                     for k, v in state.items()}
            modules.load_state_dict(state, strict=False)
        else:
            missing, unexpected = modules.load_state_dict(state, strict=False)
            # A run from before the trajectory head: the head starts fresh (at rest).
            if unexpected or any(not k.startswith("trajectory_head.") for k in missing):
                raise KeyError(f"{args.init_checkpoint} does not match: missing {missing}, unexpected {unexpected}")
        ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=0.75)
        print(f"initialised from {args.init_checkpoint}")
    if args.resume and ckpt.exists():
        modules.load_state_dict(load_file(ckpt / "model.safetensors"))
        shadow = load_file(ckpt / "ema.safetensors")
        ema.shadow_params = [shadow[f"p{i}"] for i in range(len(shadow))]
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start, ema.optimization_step = meta["step"], meta["ema_optimization_step"]
        print(f"resumed from step {start}")
    if args.export_only:
        if not args.export:
            p.error("--export-only needs --export DIR")
        export(model, ema, args, start, run_args)
        return
    model.to(device)
    ema.to(device)
    sched = model.scheduler
    log = (args.out / "log.jsonl").open("a")
    fixed = dict(item.split("=", 1) for item in args.fix)
    for attr, value in fixed.items():
        if value not in clips.CLIP_ATTRIBUTES.get(attr, ()):
            p.error(f"--fix {attr}={value}: unknown attribute or value")
    unknown = set(args.always_name) - set(clips.CLIP_ATTRIBUTES)
    if unknown:
        p.error(f"--always-name: unknown attributes {sorted(unknown)}")
    batches = clip_batches(args.seed, args.batch, start, fixed or None, {a: 0.0 for a in args.always_name} or None)
    head_batches = caption_batches(args.seed, args.caption_batch, start)
    gen = torch.Generator()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pretrain clips")
    t0, running, running_head = time.time(), None, None
    for step in bar:
        model.denoiser.train()
        model.text_encoder.train()
        frames, captions, velocity = next(batches)
        gen.manual_seed(args.seed * 7919 + step)  # per step: a resumed run draws what a straight one would
        captions = ["" if torch.rand(1, generator=gen).item() < 0.1 else c for c in captions]
        frames = frames.to(device)
        noise = torch.randn(frames.shape, generator=gen).to(device)
        t = sample_timesteps(len(frames), sched.config.num_train_timesteps, gen, args.high_noise_frac,
                             args.high_noise_min).to(device)
        # One timestep per clip: the add_noise / velocity helpers broadcast over the frames.
        flat_t = t.repeat_interleave(frames.shape[1])
        noisy = sched.add_noise(frames.flatten(0, 1), noise.flatten(0, 1), flat_t).unflatten(0, frames.shape[:2])
        target = sched.get_velocity(frames.flatten(0, 1), noise.flatten(0, 1), flat_t).unflatten(0, frames.shape[:2])
        cond = image_model.encode_captions(model, captions, device)
        pred = model.denoiser(noisy, t, cond, velocity=None if head is None else velocity.to(device)).sample
        per_clip = (pred - target).pow(2).mean(dim=(1, 2, 3, 4))
        head_captions, head_velocity = next(head_batches)
        head_loss = torch.zeros(())
        if head is not None:
            # The head reads the caption encoding but does not train it: the frozen image layers
            # depend on the encoding as it is, and a regression loss pulling on it degrades them.
            with torch.no_grad():
                head_cond = image_model.encode_captions(model, head_captions, device)
            read = head(head_cond)
            head_loss = (read - head_velocity.to(device)).pow(2).mean()
        loss = (loss_weights(sched, t) * per_clip).mean() + args.velocity_weight * head_loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; resume from the last checkpoint")
        for group in opt.param_groups:
            group["lr"] = group["scale"] * args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        running_head = head_loss.item() if running_head is None else 0.98 * running_head + 0.02 * head_loss.item()
        bar.set_postfix(loss=f"{running:.4f}", velocity_mse=f"{running_head:.3f}")
        done = step + 1
        if done % 25 == 0:
            log.write(json.dumps({"step": done, "loss": running, "velocity_mse": running_head,
                                  "elapsed_s": time.time() - t0}) + "\n")
            log.flush()
        if done % args.every == 0 or done == args.steps:
            save_checkpoint(args.out, modules, ema, opt, done, run_args)
            write_strip(ema_copy(model, ema, args.train_unet), args.out / f"strip_{done:06d}.png",
                        steps=args.strip_steps)
    if args.export:
        export(model, ema, args, args.steps, run_args)


def export(model: ClipModel, ema: EMAModel, args, step: int, run_args: dict) -> None:
    """Write the EMA weights as a clip model folder (the model card's fields are kept)."""
    card_path = args.export / "model_index.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card.update({"pretrain_steps": step, "default_guidance": 3.0, "default_eta": 1.0, "default_steps": 20,
                 **{k: run_args.get(k) for k in ("batch", "lr", "seed", "ema_decay", "train_unet")}})
    final = ema_copy(model, ema, bool(run_args.get("train_unet"))).to("cpu")
    if args.fit_head and final.denoiser.trajectory_head is not None:
        card["trajectory_head_fit"] = fit_trajectory_head(final, args.fit_head, seed=args.seed)
    final.save(args.export, card=card)
    print(f"exported the EMA model at step {step} to {args.export}")


def fit_trajectory_head(model: ClipModel, steps: int, seed: int = 0, batch: int = 256, lr: float = 3e-3) -> dict:
    """Fit the trajectory head to the final text encoder (both frozen otherwise): during
    pretraining the head chases an encoder that keeps changing, and its EMA lags behind. Only
    captions are needed, so thousands of steps take a minute. Returns the last mean squared
    error, next to its floor: the error of the exact conditional mean of the velocity given
    the caption (what an ideal head outputs; it is not zero, because captions may leave out
    the direction or the speed)."""
    head = model.denoiser.trajectory_head
    head.requires_grad_(True)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)  # linear to zero
    batches = caption_batches(seed + 17, batch, 0)
    seen: dict[str, list[list[float]]] = {}  # per caption: the velocities drawn, for the floor
    for _ in tqdm(range(steps), desc="fit trajectory head"):
        captions, velocity = next(batches)
        with torch.no_grad():
            cond = image_model.encode_captions(model, captions, "cpu")
        loss = (head(cond) - velocity).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        for caption, v in zip(captions, velocity.tolist()):
            seen.setdefault(caption, []).append(v)
    head.requires_grad_(False)
    # The within-caption variance (unbiased), weighted by how often each caption is drawn.
    groups = [torch.tensor(v) for v in seen.values() if len(v) >= 2]
    floor = sum(g.var(0, unbiased=True).sum().item() / 2 * len(g) for g in groups) / sum(len(g) for g in groups)
    return {"steps": steps, "mse": round(loss.item(), 4), "mse_floor": round(floor, 4)}


if __name__ == "__main__":
    main()
