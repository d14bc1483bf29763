"""The guard's judge against the pixels: how much of a real loss of prompt fidelity does it see?

    python -m bench.guard_judge [--judge DIR ...] [--seeds N] [--cache DIR] [--json OUT]

The fidelity guard (app/fidelity_guard.py) reads prompt fidelity with the perception model,
the same model the round's fidelity term (``fidelity_weight``) climbs. This benchmark trains
versions of the built-in model that lose fidelity on purpose (a reward for large red shapes,
whatever the prompt asks), from mild to severe, once with the fidelity term and once without,
one that shrinks shapes (a reward for small ones), and one like the app's default round (RLR
with the fidelity term and the KL). Each version and the base model then draw the same images
(the loop benchmark's 16 prompts, each from ``--seeds`` fixed seeds), and every image is read
by each judge:

- by the guard's judge (the perception model's ``accuracy``, what the guard averages: an
  attribute counts as read back when the heads give it at least the judge's ``confidence``, and
  a shape's attributes only where the presence model finds a shape); by its earlier readings
  (without the presence model; the heads' most likely value); and by more judges with
  ``--judge``, e.g. a second perception model trained from another seed;
- by the pixel judge (rlr_core/shapesworld/pixel_judge.py, fixed arithmetic, nothing to climb).

Per version: each judge's drop from the base (paired on the same noise, with its standard
error), the share of the pixel-judged drop the guard's judge reads, and, per attribute, how
often the judge reads an attribute as right where the pixels read it as wrong (lenient) or the
reverse (strict). And how often the guard, drawing only ``k`` of the 12 images per prompt (it
draws 2: 32 probe images), would flag each version (a drop past the threshold): the same images
subsampled ``RESAMPLES`` times, paired between the version and the base. The targets are the
guard's job on these versions: flag (drop past the
guard's threshold, 0.05) every version whose pixel-judged loss is past the threshold by 2 SE,
and none whose loss is below it by 2 SE.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.fidelity_guard import beyond, paired_drop
from bench.common import print_table, write_json
from bench.loop import HELD_OUT, RATE_PROMPTS
from rlr_core.training.defaults import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = DEFAULTS["fidelity_threshold"]  # the guard's default
HACK = "prefer-large+prefer-colour:red"  # ignores the prompt's size and colour
# name -> the training command line's round settings (python -m rlr_core.training)
VERSIONS: dict[str, list[str]] = {
    "mild": ["--estimator", "truncated-bp", "--truncate", "3", "--steps", "4", "--lr", "2e-3", "--kl-coef", "0",
             "--reward", HACK, "--seed", "4"],
    "medium": ["--estimator", "truncated-bp", "--truncate", "3", "--steps", "6", "--lr", "3e-3", "--kl-coef", "0",
               "--reward", HACK, "--seed", "5"],
    "severe": ["--estimator", "truncated-bp", "--truncate", "3", "--steps", "10", "--lr", "6e-3", "--kl-coef", "0",
               "--reward", HACK, "--seed", "3"],
    "severe+fidelity term": ["--estimator", "truncated-bp", "--truncate", "3", "--steps", "10", "--lr", "6e-3",
                             "--kl-coef", "0", "--reward", f"{HACK}+fidelity", "--seed", "3"],
    # a reward for small shapes, whatever the prompt asks: some shrink to specks the perception
    # model still reads as small shapes (the presence model's case)
    "shrunk": ["--estimator", "truncated-bp", "--truncate", "3", "--steps", "12", "--lr", "6e-3", "--kl-coef", "0",
               "--reward", "prefer-small", "--seed", "3"],
    "default round": ["--estimator", "rlr", "--steps", "10", "--lr", "6e-3", "--kl-coef", "0.3",
                      "--reward", f"{HACK}+fidelity", "--seed", "6"],
}
DRAW = {"steps": 20, "guidance": 3.0}  # as the guard's probes are drawn (the round's sample settings)
PROBE_SIZES = (2, 4, 8)  # images per prompt the guard could draw (it draws app.fidelity_guard.PROBE_IMAGES)
RESAMPLES = 2000  # subsamples per probe size


def train_versions(cache: Path, threads: int) -> dict[str, Path]:
    """Each version's folder, trained once with the training command line (cached)."""
    from rlr_core.training import cli

    folders = {}
    for name, args in VERSIONS.items():
        folder = cache / name.replace(" ", "-").replace("+", "-")
        if not (folder / "metrics.json").exists():
            cli.main([*args, "--batch", "6", "--prompts", *RATE_PROMPTS, "--out", str(folder),
                      "--threads", str(threads)])
        folders[name] = folder
    return folders


def read_images(images: torch.Tensor, prompts: list[str], judges: dict[str, Any]) -> dict[str, Any]:
    """Per image, each judge's fidelity, per named attribute whether each judge reads it right
    (a judge by its own rule: ``read_back``, what its ``accuracy`` averages), and whether it finds
    no shape at all (the pixels: none of the world's sizes; a judge with a presence model: that
    model's verdict)."""
    from rlr_core.shapesworld import pixel_judge
    from rlr_core.shapesworld import world as sw

    wanted = [sw.parse_caption(p).specified() for p in prompts]
    readings = pixel_judge.read(images)
    right = {"pixel": [{a: r.value(a) == v for a, v in w.items()} for r, w in zip(readings, wanted)]}
    no_shape = {"pixel": [r.size is None for r in readings]}
    for name, judge in judges.items():
        right[name] = judge.read_back(images, prompts)
        p_shown = judge.p_shown(images)
        if p_shown is not None:
            no_shape[name] = (p_shown < 0.5).tolist()
    fidelity = {name: [sum(r.values()) / len(r) for r in rows] for name, rows in right.items()}
    return {"fidelity": fidelity, "right": right, "no_shape": no_shape}


def attribute_disagreement(right: dict[str, list[dict[str, bool]]], judge: str) -> dict[str, dict[str, float]]:
    """Per attribute: the share of its readings the judge takes as right where the pixels say
    wrong (lenient) and wrong where they say right (strict)."""
    out: dict[str, dict[str, float]] = {}
    for attribute in sorted({a for row in right["pixel"] for a in row}):
        pairs = [(p[attribute], j[attribute]) for p, j in zip(right["pixel"], right[judge]) if attribute in p]
        out[attribute] = {"n": len(pairs), "lenient": round(sum(j and not p for p, j in pairs) / len(pairs), 4),
                          "strict": round(sum(p and not j for p, j in pairs) / len(pairs), 4)}
    return out


def flag_rate(base: list[float], new: list[float], per_prompt: int, k: int, rng: random.Random) -> float:
    """How often a guard drawing ``k`` of each prompt's ``per_prompt`` images (the same seeds for
    the version and the base) reads a drop past :data:`THRESHOLD`."""
    prompts = len(base) // per_prompt
    flagged = 0
    for _ in range(RESAMPLES):
        picks = [p * per_prompt + j for p in range(prompts) for j in rng.sample(range(per_prompt), k)]
        flagged += beyond(statistics.mean(base[i] - new[i] for i in picks), 0.0, THRESHOLD)
    return flagged / RESAMPLES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", action="append", default=[], type=Path,
                   help="another perception model folder to read the images with (repeatable)")
    p.add_argument("--seeds", type=int, default=12, help="images per prompt (each from its own fixed seed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "guard_judge")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "guard_judge.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from app.fidelity_guard import probe_seed
    from app.generation import GenerationSettings, draw
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.fidelity import ShapesFidelity
    from rlr_core.shapesworld import perception
    from rlr_core.training import lora

    folders = train_versions(args.cache, args.threads)
    # the guard's earlier readings: sure readings without the presence model, and before that the
    # most likely value
    no_presence = ShapesFidelity()
    no_presence.presence = None
    most_likely = ShapesFidelity()
    most_likely.presence, most_likely.confidence = None, 0.0
    judges = {"guard": ShapesFidelity(), "guard:no-presence": no_presence, "guard:most-likely": most_likely,
              **{f"judge:{d.name}": ShapesFidelity(perception.load(d)) for d in args.judge}}
    base = BuiltinBackend.load()
    prompts = [q for q in RATE_PROMPTS + HELD_OUT for _ in range(args.seeds)]
    seeds = [probe_seed(q, 7000 + i % args.seeds) for i, q in enumerate(prompts)]
    settings = GenerationSettings(**DRAW)
    read: dict[str, dict[str, Any]] = {}
    for name, folder in tqdm([("base", None), *folders.items()], desc="versions"):
        backend = base
        if folder is not None:
            backend = copy.deepcopy(base)
            lora.apply_version(backend, folder)
        images = torch.cat([draw(backend, prompts[i:i + 64], 0, settings, row_seeds=seeds[i:i + 64])
                            for i in range(0, len(prompts), 64)])
        read[name] = read_images(images, prompts, judges)

    rows, versions = [], {}
    for name in folders:
        entry: dict[str, Any] = {"settings": VERSIONS[name]}
        for judge in ["pixel", *judges]:
            # the guard's own paired drop, image by image instead of prompt by prompt
            drop, se = paired_drop(dict(enumerate(read["base"]["fidelity"][judge])),
                                   dict(enumerate(read[name]["fidelity"][judge])))
            entry[judge] = {"fidelity": round(statistics.mean(read[name]["fidelity"][judge]), 4),
                            "drop": round(drop, 4), "drop_se": round(se, 4)}
        pixel = entry["pixel"]
        for judge in judges:
            entry[judge]["share_of_pixel_drop"] = (round(entry[judge]["drop"] / pixel["drop"], 3)
                                                  if pixel["drop"] > 2 * pixel["drop_se"] else None)
            entry[judge]["attributes"] = attribute_disagreement(read[name]["right"], judge)
        entry["guard"]["flag_rate"] = {str(k): flag_rate(read["base"]["fidelity"]["guard"],
                                                         read[name]["fidelity"]["guard"], args.seeds, k,
                                                         random.Random(k))
                                       for k in PROBE_SIZES if k < args.seeds}
        entry["no_shape"] = {j: round(statistics.mean(v), 4) for j, v in read[name]["no_shape"].items()}
        versions[name] = entry
        rows.append({"version": name, "pixel drop": f"{pixel['drop']:.3f} ± {pixel['drop_se']:.3f}",
                     **{f"{j} drop": f"{entry[j]['drop']:.3f} ± {entry[j]['drop_se']:.3f}" for j in judges},
                     "guard share": entry["guard"]["share_of_pixel_drop"],
                     **{f"flagged at {k}/prompt": v for k, v in entry["guard"]["flag_rate"].items()}})
    base_fid = {j: round(statistics.mean(v), 4) for j, v in read["base"]["fidelity"].items()}
    base_no_shape = {j: round(statistics.mean(v), 4) for j, v in read["base"]["no_shape"].items()}
    print_table(rows, list(rows[0]), title=f"fidelity drop from the base ({len(prompts)} images each; base {base_fid})")

    must = [n for n, v in versions.items() if v["pixel"]["drop"] - 2 * v["pixel"]["drop_se"] > THRESHOLD]
    must_not = [n for n, v in versions.items() if v["pixel"]["drop"] + 2 * v["pixel"]["drop_se"] < THRESHOLD]
    targets = [
        {"check": f"the guard's judge reads a drop past {THRESHOLD} for every version the pixels put past it by 2 SE",
         "value": {n: versions[n]["guard"]["drop"] for n in must}, "met": all(versions[n]["guard"]["drop"] > THRESHOLD
                                                                            for n in must)},
        {"check": f"the guard's judge reads no drop past {THRESHOLD} for a version the pixels put below it by 2 SE",
         "value": {n: versions[n]["guard"]["drop"] for n in must_not},
         "met": all(versions[n]["guard"]["drop"] <= THRESHOLD for n in must_not)},
    ]
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'}  {t['check']}: {t['value']}")
    write_json(args.json, {"draw": {**DRAW, "prompts": RATE_PROMPTS + HELD_OUT, "images_per_prompt": args.seeds},
                           "threshold": THRESHOLD, "base": base_fid, "base_no_shape": base_no_shape,
                           "versions": versions, "targets": targets})


if __name__ == "__main__":
    main()
