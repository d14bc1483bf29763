"""Fidelity of the built-in clip model: does a generated clip show what its caption asked for?

    python -m bench.video_fidelity [--json OUT] [--model DIR] [--prompts N] [--batch B] [--threads T]

Generates one clip per caption for a fixed set of fully specified captions (balanced over every
attribute; a quarter of them held-out colour/kind pairs never seen in training), reads each clip
with the clip perception model, and reports per-attribute accuracy (speed over moving clips
only) for all, seen and held-out captions, the time to draw 4 clips, and its targets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import peak_rss_mb, print_table, write_json
from bench.fidelity import best_of
from rlr_core.backends.builtin_clips import BuiltinClipBackend
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import clip_perception, clips
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.video_model import DEFAULT_CLIP_MODEL_DIR

TARGETS: dict[str, float] = {"direction": 0.85, "speed": 0.75, "kind": 0.75, "colour": 0.85, "background": 0.90}
SECONDS_PER_4_CLIPS_TARGET = 30.0


def _cycled(values: list, n: int, rng: random.Random) -> list:
    """``n`` values, each of ``values`` equally often (up to one), in a shuffled order."""
    out = list(itertools.islice(itertools.cycle(values), n))
    rng.shuffle(out)
    return out


def benchmark_scenes(n: int, seed: int = 2024) -> list[clips.ClipScene]:
    """``n`` fully specified clips in a fixed order, balanced over every attribute: 3/4 from the
    trained colour/kind pairs, 1/4 held-out pairs; directions equally often, and among the
    moving clips each speed equally often."""
    rng = random.Random(seed)
    n_held = n // 4
    seen_pairs = [(c, k) for c in sw.COLOURS for k in sw.KINDS if (c, k) not in sw.HELD_OUT_PAIRS]
    pairs = _cycled(seen_pairs, n - n_held, rng) + _cycled(sorted(sw.HELD_OUT_PAIRS), n_held, rng)
    sizes = _cycled(list(sw.SIZES), n, rng)
    backgrounds = _cycled(list(sw.BACKGROUNDS), n, rng)
    directions = _cycled(list(clips.DIRECTIONS), n, rng)
    speeds = iter(_cycled(list(clips.SPEEDS), sum(d != "still" for d in directions), rng))
    return [clips.ClipScene(kind=kind, colour=colour, size=size, direction=direction,
                            speed=next(speeds) if direction != "still" else "slow", background=background)
            for (colour, kind), size, background, direction in zip(pairs, sizes, backgrounds, directions)]


def score(predicted: list[dict[str, str]], scenes: list[clips.ClipScene]) -> dict[str, float | None]:
    """Accuracy per attribute; speed over the moving clips only (None where there are none)."""
    out: dict[str, float | None] = {}
    for name in clips.CLIP_ATTRIBUTES:
        pairs = [(p, s) for p, s in zip(predicted, scenes) if name != "speed" or s.moving]
        out[name] = sum(p[name] == getattr(s, name) for p, s in pairs) / len(pairs) if pairs else None
    return out


def targets(accuracy: dict[str, float | None], seconds_per_4: float) -> list[dict]:
    rows = [{"check": f"{name} accuracy >= {int(goal * 100)}%", "value": accuracy[name],
             "met": accuracy[name] is not None and accuracy[name] >= goal} for name, goal in TARGETS.items()]
    rows.append({"check": f"seconds_per_4_clips <= {SECONDS_PER_4_CLIPS_TARGET:g}", "value": seconds_per_4,
                 "met": seconds_per_4 <= SECONDS_PER_4_CLIPS_TARGET})
    return rows


def run(model_dir: str | Path, n: int, steps: int, guidance: float, eta: float, batch: int, seed: int,
        speed_repeats: int = 3, judge_dir: str | Path | None = None) -> dict:
    backend = BuiltinClipBackend.load(model_dir)
    judge = clip_perception.load(judge_dir or clip_perception.DEFAULT_CLIP_PERCEPTION_DIR)
    scenes = benchmark_scenes(n)
    settings = SamplerSettings(steps, eta, guidance)
    predicted: list[dict[str, str]] = []
    gen_seconds = 0.0
    for start in tqdm(range(0, n, batch), desc="video fidelity"):
        chunk = scenes[start:start + batch]
        t0 = time.perf_counter()
        frames = generate(backend, [clips.clip_caption(s) for s in chunk], settings, seed=seed + start)
        gen_seconds += time.perf_counter() - t0
        predicted += judge.predict(frames)
    four = [clips.clip_caption(s) for s in scenes[:4]]
    seconds_per_4 = best_of(lambda r: generate(backend, four, settings, seed=r), speed_repeats)
    held = [s.held_out for s in scenes]
    groups = {
        "all": score(predicted, scenes),
        "seen": score([p for p, h in zip(predicted, held) if not h], [s for s in scenes if not s.held_out]),
        "held_out": score([p for p, h in zip(predicted, held) if h], [s for s in scenes if s.held_out]),
    }
    return {
        "settings": {"model": str(model_dir), "prompts": n, "held_out_prompts": sum(held),
                     "moving_prompts": sum(s.moving for s in scenes), "frames": backend.num_frames,
                     "steps": steps, "guidance": guidance, "eta": eta, "batch": batch, "seed": seed,
                     "threads": torch.get_num_threads(), "speed_repeats": speed_repeats},
        "accuracy": groups,
        "clips_per_s": n / gen_seconds,
        "seconds_per_4_clips": seconds_per_4,
        "targets": targets(groups["all"], seconds_per_4),
        "peak_rss_mb": peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--model", default=str(DEFAULT_CLIP_MODEL_DIR))
    p.add_argument("--judge", default=None, help="clip perception folder (default: models/clip-perception)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="default: the model card's")
    p.add_argument("--eta", type=float, default=None, help="default: the model card's")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-repeats", type=int, default=3, help="seconds_per_4_clips: best of this many")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    card = json.loads((Path(args.model) / "model_index.json").read_text())
    guidance = args.guidance if args.guidance is not None else card.get("default_guidance", 3.0)
    eta = args.eta if args.eta is not None else card.get("default_eta", 1.0)
    result = run(args.model, args.prompts, args.steps, guidance, eta, args.batch, args.seed,
                 args.speed_repeats, args.judge)
    rows = [{"prompts": group, **{k: (round(v * 100, 1) if v is not None else "-") for k, v in acc.items()}}
            for group, acc in result["accuracy"].items()]
    print_table(rows, ["prompts", *clips.CLIP_ATTRIBUTES],
                f"per-attribute accuracy (%), {args.prompts} clips, {args.steps} steps, guidance {guidance}, "
                f"eta {eta} (speed: moving clips only)")
    print(f"\n4 clips ({result['settings']['frames']} frames, {args.steps} steps), best of {args.speed_repeats}: "
          f"{result['seconds_per_4_clips']:.1f} s; peak RSS {result['peak_rss_mb']:.0f} MB")
    print_table(result["targets"], ["check", "value", "met"], title="targets")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
