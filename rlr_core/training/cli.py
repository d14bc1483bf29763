"""Headless training rounds.

    python -m rlr_core.training --estimator rlr --block 2 --rest lr --steps 20 --batch 4 \\
        --prompts "a red circle" "a blue square" --reward fidelity --out runs/versions/v1

Works as is on one CPU process and under ``accelerate launch`` (gradients are averaged over
processes; the main process writes the version). See docs/training.md for every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from rlr_core.estimators import ESTIMATORS
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld.model import DEFAULT_MODEL_DIR
from rlr_core.training import DEFAULT_PROMPTS, EstimatorConfig, Progress, TrainConfig, TrainingDiverged, run_round
from rlr_core.training.presets import PRESETS, apply_preset

# An estimator flag -> (the estimators that take it, their option's field). The option's default is
# its dataclass's (rlr_core/estimators): a flag left out is not passed, so there is no second copy.
OPTION_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "block": (("rlr",), "block"), "rest": (("rlr",), "rest"), "tail": (("rlr",), "tail"),
    "min_sigma_ratio": (("rlr",), "min_sigma_ratio"), "block_start": (("rlr",), "block_start"),
    "window": (("rlr",), "window"), "rest_steps": (("rlr",), "rest_steps"), "zo_scale": (("rlr",), "zo_scale"),
    "memory_budget_gb": (("rlr",), "memory_budget_gb"), "branches": (("rlr",), "branches"),
    "group_size": (("rlr",), "group_size"),
    "baseline": (("rlr", "lr"), "baseline"), "control_variate": (("rlr", "lr"), "control_variate"),
    "truncate": (("truncated-bp",), "steps"), "randomize_truncation": (("truncated-bp",), "randomize"),
    "inner_epochs": (("ddpo",), "inner_epochs"), "clip_range": (("ddpo",), "clip_range"),
    "whiten": (("ddpo",), "whiten"),
}


def estimator_options(args: argparse.Namespace) -> dict:
    """The settings of the chosen estimator from the flags given that apply to it (and --kl-coef,
    which every estimator takes); what is not given takes the estimator's own default."""
    opts = {field: getattr(args, dest) for dest, (names, field) in OPTION_FLAGS.items()
            if args.estimator in names and getattr(args, dest) is not None}
    if isinstance(opts.get("window"), list):
        opts["window"] = tuple(opts["window"])
    return {**opts, "kl_coef": args.kl_coef} if args.kl_coef else opts


def _default(estimator: str, field: str) -> str:
    """' (default: X)' from the estimator's dataclass, for a flag's help."""
    for f in dataclasses.fields(ESTIMATORS[estimator]):
        if f.name == field and f.default is not dataclasses.MISSING:
            return f" (default: {f.default})"
    return ""


def _block(value: str) -> int | str:
    return value if value == "auto" else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlr_core.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("estimator")
    g.add_argument("--estimator", default="rlr", choices=["rlr", "full-bp", "truncated-bp", "lr", "ddpo"])
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named recipe that sets the estimator and the sampler's eta. authors-code: "
                   + PRESETS["authors-code"].summary)
    g.add_argument("--block", type=_block, help="RLR: HO block size h, or 'auto' (from --memory-budget-gb)"
                   + _default("rlr", "block"))
    g.add_argument("--rest", choices=["lr", "zo", "none"], help="RLR: rest-of-chain term" + _default("rlr", "rest"))
    g.add_argument("--tail", type=int, help="RLR: FO tail L (default: from the sigma schedule)")
    g.add_argument("--min-sigma-ratio", type=float,
                   help="RLR: sigma threshold for the default L" + _default("rlr", "min_sigma_ratio"))
    g.add_argument("--block-start", choices=["uniform", "grad-norm"], help="RLR" + _default("rlr", "block_start"))
    g.add_argument("--window", type=int, nargs=2, metavar=("A", "B"), help="RLR: block starts j in [A, B] (DCoT)")
    g.add_argument("--rest-steps", type=int, help="RLR 'lr': m random steps, rescaled by |C|/m")
    g.add_argument("--zo-scale", type=float, help="RLR 'zo': perturbation std s" + _default("rlr", "zo_scale"))
    g.add_argument("--memory-budget-gb", type=float, help="RLR: the memory h = 'auto' may use")
    g.add_argument("--baseline", choices=["loo", "state", "state+loo"],
                   help="rlr/lr: what R is compared with in likelihood-ratio terms (docs/method.md section 2; "
                   "default: state for rlr, loo for lr)")
    g.add_argument("--branches", type=int,
                   help="RLR: M continuations of the HO block's last step" + _default("rlr", "branches"))
    g.add_argument("--control-variate", choices=["none", "taylor"],
                   help="rlr/lr: the first-order (Taylor) control variate on likelihood-ratio terms "
                   "(docs/method.md section 2; default: the estimator's)")
    g.add_argument("--group-size", type=int,
                   help="RLR: G > 1 makes each batch B/G prompts x G rows sharing the initial noise, "
                   "with per-prompt leave-one-out baselines" + _default("rlr", "group_size"))
    g.add_argument("--kl-coef", type=float, default=0.0,
                   help="any estimator: weight of the exact per-step KL to the base model (LoRA off)")
    g.add_argument("--truncate", type=int, help="truncated-bp: K' final steps" + _default("truncated-bp", "steps"))
    g.add_argument("--randomize-truncation", action="store_true", default=None)
    g.add_argument("--inner-epochs", type=int,
                   help="ddpo: optimiser steps per batch" + _default("ddpo", "inner_epochs"))
    g.add_argument("--clip-range", type=float, help="ddpo: PPO clip range" + _default("ddpo", "clip_range"))
    g.add_argument("--whiten", action="store_true", default=None, help="ddpo: divide advantages by the reward std")
    g = p.add_argument_group("round")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    g.add_argument("--prompts-file", type=Path, help="one prompt per line (overrides --prompts)")
    g.add_argument("--reward", default="fidelity",
                   help="fidelity | prefer-large | prefer-small | prefer-<attr>:<value> | a+b")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--finetune", default="lora", choices=["lora", "full"])
    g.add_argument("--lora-rank", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("model and sampler")
    g.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="built-in model folder")
    g.add_argument("--latent-model", default=None, help="a Stable-Diffusion-like pipeline folder or id instead")
    g.add_argument("--perception", type=Path, default=None, help="perception model folder (rewards)")
    g.add_argument("--start-from", type=Path, default=None, help="a version folder to continue from")
    g.add_argument("--sampling-steps", type=int, default=20)
    g.add_argument("--eta", type=float, default=1.0)
    g.add_argument("--guidance", type=float, default=3.0)
    g.add_argument("--out", type=Path, required=True, help="the version folder to write")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    g.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from rlr_core import rewards
    from rlr_core.backends.builtin import BuiltinBackend
    from rlr_core.training import lora

    accelerator = Accelerator(cpu=args.cpu)
    if args.latent_model:
        from rlr_core.backends.latent import DiffusersLatentBackend

        backend = DiffusersLatentBackend.from_pretrained(args.latent_model, device=accelerator.device)
    else:
        backend = BuiltinBackend.load(args.model, device=accelerator.device)
    if args.start_from:
        lora.apply_version(backend, args.start_from)
    reward_fn = rewards.make_reward(args.reward, rewards.load_perception(args.perception, accelerator.device))
    prompts = args.prompts_file.read_text().splitlines() if args.prompts_file else args.prompts
    config = TrainConfig(
        estimator=EstimatorConfig(args.estimator, estimator_options(args)), steps=args.steps,
        batch=args.batch, prompts=[p for p in prompts if p.strip()],
        sampler=SamplerSettings(args.sampling_steps, args.eta, args.guidance), finetune=args.finetune,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lr=args.lr, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, seed=args.seed,
    )
    if args.preset:
        config = apply_preset(config, args.preset)
        if args.kl_coef:
            config.estimator.options["kl_coef"] = args.kl_coef
        print(f"preset {args.preset}: {PRESETS[args.preset].summary}")
    bar = tqdm(total=args.steps, desc=f"{config.estimator.name} round", disable=not accelerator.is_main_process)

    def progress(p: Progress) -> None:
        bar.update(1)
        bar.set_postfix(reward=f"{p.reward_mean:.3f}+-{p.reward_std:.3f}", grad=f"{p.grad_norm:.3g}")

    try:
        result = run_round(backend, reward_fn, config, args.out, progress=progress, accelerator=accelerator)
    except TrainingDiverged as err:
        bar.close()
        print(f"training stopped: {err}")
        return 1
    bar.close()
    if accelerator.is_main_process:
        summary = {k: v for k, v in result.metrics.items() if k != "history"}
        print(json.dumps({"version": str(result.version), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
