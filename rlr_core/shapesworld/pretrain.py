"""Pretrain the built-in ShapesWorld model from scratch.

    python -m rlr_core.shapesworld.pretrain --out runs/pretrain [--resume] [--steps N] [--batch 32]

Recipe (chosen to learn fast on two CPU cores): v-prediction on a cosine noise schedule,
Min-SNR-5 loss weighting (Hang et al. 2023) kept at 1 at high noise, AdamW with warm-up then a constant rate, EMA of
the weights (the EMA copy is what ships), 10% empty captions for classifier-free guidance.
Data is rendered on the fly, so there is no data set to download or store.
Checkpoints (safetensors + a small JSON) and a PNG sample grid are written every
``--every`` steps; ``--resume`` continues from the latest one bit for bit in its data stream.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.images import to_pil
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld import world as shapes_world
from rlr_core.shapesworld.model import BuiltinModel

GRID_PROMPTS = [
    "a large red circle on the left, black background",
    "a small blue square in the center, white background",
    "a large yellow triangle on the right, navy background",
    "a large green circle in the center, gray background",
    "a small purple triangle on the left, black background",
    "a large orange circle on the right, white background",
    "a large green triangle in the center, black background",  # held-out pair
    "a purple circle",  # held-out pair, open attributes
]


def batch_stream(seed: int, batch: int, start_step: int, drop_overrides: dict[str, float] | None = None,
                 fixed: dict[str, str] | None = None):
    """Batches of (images in [-1, 1], captions); skips ``start_step`` batches on resume."""
    examples = shapes_world.training_examples(seed, drop_overrides=drop_overrides, fixed=fixed)
    for _ in range(start_step * batch):
        next(examples)
    while True:
        items = [next(examples) for _ in range(batch)]
        images = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2)
        yield images * 2 - 1, [cap for _, cap, _ in items]


def loss_weights(scheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights on the v-prediction MSE: 1 up to SNR gamma - 1, Min-SNR's cap above.

    The v-loss is (SNR + 1) times the x0-loss. Min-SNR (Hang et al. 2023) weights the x0-loss
    by min(SNR, gamma), which on the v-loss is min(SNR, gamma) / (SNR + 1): close to 0 at high
    noise. But the high-noise steps are where a sample's layout (position, background, kind)
    is decided; with that form the first model got background and kind wrong (79% and 54%;
    100% and 94% after the change, see the model card). Here the
    x0-weight is min(SNR + 1, gamma): plain v-loss (weight 1) at high noise, Min-SNR's cap on
    the nearly clean steps.
    """
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr + 1, max=gamma) / (snr + 1)


def sample_timesteps(n: int, num_train: int, gen: torch.Generator, high_frac: float, high_min: int) -> torch.Tensor:
    """Uniform timesteps, with a fraction ``high_frac`` drawn from [high_min, T) instead.

    Why: where the shape goes is decided at the first sampling steps, at noise levels so high
    (t >= ~900 on the cosine schedule: SNR < 0.025) that a 32x32 image no longer shows it; only
    there must position come from the caption. Those steps are ~10% of uniform draws, and the
    position words sat on a plateau for 7,750 steps (the model card has the measurements, and the
    curriculum in scripts/position_curriculum.sh that got past it).
    """
    t = torch.randint(0, num_train, (n,), generator=gen)
    if high_frac > 0:  # extra draws only then, so runs without it keep their random stream
        high = torch.randint(high_min, num_train, (n,), generator=gen)
        t = torch.where(torch.rand(n, generator=gen) < high_frac, high, t)
    return t


POSITION_PROBES = ["a small blue square {}, white background", "a yellow triangle {}",
                   "a large green circle {}, navy background", "a purple shape {}"]


@torch.no_grad()
def position_gap(model: BuiltinModel) -> float:
    """Mean |denoiser output| difference between "on the left" and "on the right" prompts at
    t = T-1 from the same noise (0 when position words are ignored; ~0.3 when obeyed)."""
    model.unet.eval()
    backend = BuiltinBackend(model)
    x = torch.randn(4, *backend.state_shape, generator=torch.Generator().manual_seed(5)).to(backend.device)
    t = torch.full((4,), model.scheduler.config.num_train_timesteps - 1, device=backend.device)

    def out(prompt: str) -> torch.Tensor:
        return backend.model_output(x, t, backend.encode_prompts([prompt] * 4))

    gaps = [(out(p.format("on the left")) - out(p.format("on the right"))).abs().mean() for p in POSITION_PROBES]
    return float(torch.stack(gaps).mean())


def widen_input(state: dict[str, torch.Tensor], unet, seed: int = 0) -> dict[str, torch.Tensor]:
    """Warm start across added input channels (the coordinate channels): conv_in keeps the old
    channels' weights; the new ones are drawn at the old weights' scale. Not zeros: a zero
    coordinate path next to text that barely tells "left" from "right" is a saddle (each side's
    gradient is proportional to the other), and a first attempt sat on it for 500 steps."""
    key = "conv_in.weight"
    want = unet.conv_in.weight.shape
    if key in state and state[key].shape != want and state[key].shape[1] < want[1]:
        old = state[key]
        gen = torch.Generator().manual_seed(seed)
        wide = torch.randn(want, generator=gen, dtype=old.dtype) * old.std()
        wide[:, : old.shape[1]] = old
        state = {**state, key: wide}
    return state


def redraw_token_embeddings(model: BuiltinModel, words: list[str], scale: float, seed: int = 0) -> None:
    """Give ``words`` fresh, distinct input embeddings of norm ``scale`` x the vocabulary's mean.

    For a warm start where the text encoder learned to ignore words the denoiser could not use
    (position words, before the UNet saw coordinates): their outputs then differ by far less
    than other attributes', and nothing downstream pulls them apart."""
    table = model.text_encoder.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    mean_norm = table.detach().norm(dim=1).mean()
    with torch.no_grad():
        for word in words:
            index = model.tokenizer.convert_tokens_to_ids(word)
            if index == model.tokenizer.unk_token_id:
                raise ValueError(f"--redraw-tokens: {word!r} is not in the vocabulary")
            fresh = torch.randn(table.shape[1], generator=gen)
            table[index] = fresh / fresh.norm() * mean_norm * scale


def trainable_modules(model: BuiltinModel) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"unet": model.unet, "text_encoder": model.text_encoder})


def save_checkpoint(out: Path, model: BuiltinModel, ema: EMAModel, opt, step: int, args) -> None:
    ckpt = out / "checkpoint"
    tmp = out / "checkpoint.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    modules = trainable_modules(model)
    save_file({k: v.contiguous() for k, v in modules.state_dict().items()}, tmp / "model.safetensors")
    ema_state = {f"p{i}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)}
    save_file(ema_state, tmp / "ema.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors only: loaded weights_only
    plain_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    meta = {"step": step, "ema_optimization_step": ema.optimization_step, "args": plain_args}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    # Keep the previous checkpoint as checkpoint.prev: a run that went bad between two
    # checkpoints can still be resumed from the one before.
    prev = out / "checkpoint.prev"
    if ckpt.exists():
        if prev.exists():
            for f in prev.iterdir():
                f.unlink()
            prev.rmdir()
        ckpt.rename(prev)
    tmp.rename(ckpt)


def ema_model(model: BuiltinModel, ema: EMAModel) -> BuiltinModel:
    """A copy of ``model`` carrying the EMA weights."""
    import copy

    copy_ = copy.deepcopy(model)
    ema.copy_to(trainable_modules(copy_).parameters())
    return copy_


def write_grid(model: BuiltinModel, path: Path, seed: int = 0) -> None:
    model.unet.eval()
    images = generate(BuiltinBackend(model), GRID_PROMPTS, SamplerSettings(steps=20, guidance=3.0), seed=seed)
    tiles = [to_pil(im, scale=4) for im in images]
    from PIL import Image

    grid = Image.new("RGB", (128 * 4, 128 * 2), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % 4) * 128, (i // 4) * 128))
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/pretrain"))
    p.add_argument("--steps", type=int, default=6000, help="stop after this many steps in all")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--every", type=int, default=250, help="checkpoint and grid interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this model folder's weights (fresh optimizer and EMA) instead of random")
    p.add_argument("--redraw-tokens", nargs="+", default=[],
                   help="with --init: fresh input embeddings for these words (see redraw_token_embeddings)")
    p.add_argument("--redraw-scale", type=float, default=3.0,
                   help="their norm, in multiples of the vocabulary's mean embedding norm")
    p.add_argument("--spike-factor", type=float, default=4.0,
                   help="stop when the smoothed loss exceeds this multiple of its best value (divergence)")
    p.add_argument("--high-noise-frac", type=float, default=0.0,
                   help="fraction of timesteps drawn from [--high-noise-min, T) (see sample_timesteps)")
    p.add_argument("--high-noise-min", type=int, default=900)
    p.add_argument("--position-drop-prob", type=float, default=None,
                   help="drop probability of the position phrase (default: that of every attribute, 0.3)")
    p.add_argument("--fix", nargs="+", default=[], metavar="ATTR=VALUE",
                   help="render only scenes with these attributes (curriculum stages), e.g. background=black")
    p.add_argument("--export", type=Path, default=None, help="write the EMA model folder here at the end")
    p.add_argument("--export-only", action="store_true",
                   help="with --resume and --export: export the latest checkpoint's EMA model and exit")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    model = builtin_model.new_model(args.seed)
    modules = trainable_modules(model)
    opt = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=0.01)
    ema = EMAModel(modules.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    start = 0
    run_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.init and not args.resume:
        init = builtin_model.load_model(args.init)
        # Non-strict for the UNet: a folder from before a module was added (the pooled-text
        # embedding) loads, and the new module keeps its zero-initialised no-op start.
        missing, unexpected = model.unet.load_state_dict(widen_input(init.unet.state_dict(), model.unet), strict=False)
        if unexpected:
            raise ValueError(f"{args.init} has UNet weights this architecture lacks: {unexpected}")
        if missing:
            print(f"new modules (not in {args.init}): {sorted({k.rsplit('.', 2)[0] for k in missing})}")
        model.text_encoder.load_state_dict(init.text_encoder.state_dict())
        if args.redraw_tokens:
            redraw_token_embeddings(model, args.redraw_tokens, args.redraw_scale, seed=args.seed)
            print(f"re-drew the token embeddings of {args.redraw_tokens}")
        ema = EMAModel(modules.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
        print(f"initialised from {args.init}")
    ckpt = args.out / "checkpoint"
    if args.resume and ckpt.exists():
        modules.load_state_dict(load_file(ckpt / "model.safetensors"))
        shadow = load_file(ckpt / "ema.safetensors")
        ema.shadow_params = [shadow[f"p{i}"] for i in range(len(shadow))]
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        meta = json.loads((ckpt / "state.json").read_text())
        start, ema.optimization_step = meta["step"], meta["ema_optimization_step"]
        run_args = meta["args"]  # the card records the run's recipe, not this command line's
        print(f"resumed from step {start}")
    if args.export_only:
        if not args.export:
            p.error("--export-only needs --export DIR")
        export(model, ema, args.export, start, run_args)
        return
    model.to(device)
    ema.to(device)
    sched = model.scheduler
    lr_at = lambda s: args.lr * min(1.0, (s + 1) / args.warmup)  # noqa: E731
    log = (args.out / "log.jsonl").open("a")
    overrides = {"position": args.position_drop_prob} if args.position_drop_prob is not None else None
    fixed = dict(item.split("=", 1) for item in args.fix)
    for attr, value in fixed.items():
        if value not in shapes_world.ATTRIBUTES.get(attr, ()):
            p.error(f"--fix {attr}={value}: unknown attribute or value")
    batches = batch_stream(args.seed, args.batch, start, overrides, fixed or None)
    gen = torch.Generator()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pretrain")
    t0, running, best = time.time(), None, float("inf")
    for step in bar:
        model.unet.train()
        model.text_encoder.train()
        images, captions = next(batches)
        gen.manual_seed(args.seed * 7919 + step)  # per step, so a resumed run draws what a straight one would
        captions = ["" if torch.rand(1, generator=gen).item() < 0.1 else c for c in captions]
        images = images.to(device)
        noise = torch.randn(images.shape, generator=gen).to(device)
        t = sample_timesteps(len(images), sched.config.num_train_timesteps, gen, args.high_noise_frac,
                             args.high_noise_min).to(device)
        noisy = sched.add_noise(images, noise, t)
        target = sched.get_velocity(images, noise, t)
        cond = builtin_model.encode_captions(model, captions, device)
        pred = model.unet(noisy, t, cond).sample
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_weights(sched, t) * per_sample).mean()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; resume from the last checkpoint")
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        ema.step(modules.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step > start + args.warmup:
            best = min(best, running)
            if running > args.spike_factor * best:
                raise FloatingPointError(
                    f"training diverged at step {step}: smoothed loss {running:.4f} is over "
                    f"{args.spike_factor}x its best {best:.4f}; lower --lr and resume from the last checkpoint")
        done = step + 1
        if done % 25 == 0:
            log.write(json.dumps({"step": done, "loss": running, "lr": lr_at(step),
                                  "elapsed_s": time.time() - t0}) + "\n")
            log.flush()
        if done % args.every == 0 or done == args.steps:
            save_checkpoint(args.out, model, ema, opt, done, args)
            ema_copy = ema_model(model, ema)
            write_grid(ema_copy, args.out / f"grid_{done:06d}.png")
            gap = position_gap(ema_copy)
            log.write(json.dumps({"step": done, "position_gap": gap}) + "\n")
            log.flush()
            tqdm.write(f"step {done}: position gap {gap:.4f} (0 = position words ignored)")
    if args.export:
        export(model, ema, args.export, args.steps, run_args)


def export(model: BuiltinModel, ema: EMAModel, folder: Path, step: int, run_args: dict) -> None:
    """Write the EMA weights as a model folder; keeps the card's other fields if present."""
    card_path = folder / "model_index.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card.update({"pretrain_steps": step, **{k: run_args.get(k) for k in ("batch", "lr", "seed", "ema_decay", "init")}})
    ema_model(model, ema).to("cpu").save(folder, card=card)
    print(f"exported the EMA model at step {step} to {folder}")


if __name__ == "__main__":
    main()
