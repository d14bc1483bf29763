"""Benchmark: alignment runs on clips (the image alignment benchmark's machinery, on the clip model).

    python -m bench.video_alignment [--json OUT] [--plot OUT.png] [--model DIR] [--reward prefer-fast]

Every method starts from the same clip model (a fresh LoRA adapter), maximises the same clip
reward (default ``prefer-fast``: the clip perception model's log p(the shape moves fast)) on the
same training captions with the same sample budget and seeds, and is evaluated on held-out
captions with the reward and with the clip perception model's prompt fidelity (leaving out the
attributes the reward asks for whatever the caption says). Defaults compare RLR (the default
estimator) with truncated BP on a small budget; the check that matters here: the reward rises
for RLR over the round. Curves, caching (``--cache``, ``--from-cache``) and ``--jobs`` work as
in bench.alignment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import alignment
from bench.common import print_table, write_json
from rlr_core.backends.builtin_clips import BuiltinClipBackend
from rlr_core.shapesworld.video_model import DEFAULT_CLIP_MODEL_DIR

TRAIN_PROMPTS = ["a red circle moving slowly to the right", "a blue square moving up, black background",
                 "a large yellow triangle moving left", "a small green circle moving down, white background",
                 "a purple square moving slowly to the left", "an orange triangle moving up, navy background"]
EVAL_PROMPTS = ["a large blue circle moving to the right", "a small red triangle moving slowly down, gray background",
                "a yellow square moving left", "a green square moving up, black background"]


def load_clip_backend(model_dir: Path, device: str) -> BuiltinClipBackend:
    backend = BuiltinClipBackend.load(model_dir, device=device)
    backend.model.text_encoder.requires_grad_(False)
    return backend


def rises(curves: dict[str, list[alignment.Curve]], method: str = "rlr") -> dict | None:
    """The check this benchmark exists for: the method's eval reward ends above where it started
    (mean over seeds)."""
    if method not in curves:
        return None
    runs = curves[method]
    start = sum(r[0]["eval_reward"] for r in runs) / len(runs)
    final = sum(r[-1]["eval_reward"] for r in runs) / len(runs)
    return {"check": f"{method}: eval reward rises over the round", "value": f"{start:.3f} -> {final:.3f}",
            "met": final > start}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--model", type=Path, default=DEFAULT_CLIP_MODEL_DIR)
    p.add_argument("--methods", nargs="+", default=["rlr", "truncated-bp"], choices=list(alignment.METHODS))
    p.add_argument("--judge", type=Path, default=None, help="clip perception folder (default: models/clip-perception)")
    p.add_argument("--reward", default="prefer-fast", help="a clip reward (rlr_core.rewards), e.g. prefer-colour:red")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=12, help="training steps (sample batches) per run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="sampling steps K")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--inner-epochs", type=int, default=4, help="DDPO optimiser steps per batch")
    p.add_argument("--truncate", type=int, default=1, help="truncated BP: K'")
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-seeds", type=int, default=1, help="clips per evaluation caption")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--from-cache", action="store_true")
    args = p.parse_args(argv)
    if args.from_cache and not args.cache:
        p.error("--from-cache needs --cache")
    # What bench.alignment's runs read beyond its own options: clip runs, clip captions.
    args.video, args.train_prompts, args.eval_prompts = True, TRAIN_PROMPTS, EVAL_PROMPTS
    if args.threads and args.jobs == 1:
        torch.set_num_threads(args.threads)
    curves, partial = alignment.run_all(args)
    if not curves:
        raise SystemExit("no runs to summarise")
    rows = alignment.summarise(curves)
    checks = [c for c in [rises(curves)] if c] + alignment.issue_targets(curves)
    title = (f"clip alignment: reward {args.reward}, {args.rounds} steps x batch {args.batch}, K={args.steps}, "
             f"lr {args.lr:g}, {args.seeds} seeds" + (f" ({partial} runs unfinished)" if partial else ""))
    print_table(rows, list(rows[0]), title=title)
    print_table(checks, ["check", "value", "met"], title="alignment checks")
    if args.plot:
        alignment.plot(curves, args.plot, title)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "partial_runs": partial, "summary": rows, "targets": checks, "curves": curves}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
