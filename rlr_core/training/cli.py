"""Headless training rounds.

    python -m rlr_core.training --estimator rlr --block 2 --rest lr --steps 20 --batch 4 \\
        --prompts "a red circle" "a blue square" --reward fidelity --out runs/versions/v1

Works as is on one CPU process and under ``accelerate launch`` (gradients are averaged over
processes; the main process writes the version). A round setting left out takes the loaded model's
default (rlr_core/training/defaults.py, the table the app's rounds start from); an estimator's
flags come from its options dataclass (rlr_core/estimators/schema.py). See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlr_core.estimators import ESTIMATORS
from rlr_core.estimators.schema import OptionError, OptionSpec, drop_implicit, from_public, options_schema
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld.model import DEFAULT_MODEL_DIR
from rlr_core.training import DEFAULT_PROMPTS, EstimatorConfig, Progress, TrainConfig, TrainingDiverged, run_round
from rlr_core.training.defaults import DEFAULTS, defaults_for
from rlr_core.training.presets import PRESETS, apply_preset
from rlr_core.training.round import KL_REFERENCES


def _option_flags() -> dict[str, tuple[tuple[str, ...], OptionSpec]]:
    """Every estimator option's flag (its argparse dest) -> (the estimators that take it, its spec),
    from the estimators' schemas (rlr_core/estimators/schema.py)."""
    flags: dict[str, tuple[tuple[str, ...], OptionSpec]] = {}
    for name, cls in ESTIMATORS.items():
        for spec in options_schema(cls):
            dest = spec.flag.replace("-", "_")
            names, first = flags.get(dest, ((), spec))
            flags[dest] = ((*names, name), first)
    return flags


FLAGS = _option_flags()
# An estimator flag -> (the estimators that take it, their option's field). The option's default is
# its dataclass's: a flag left out is not passed, so there is no second copy.
OPTION_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    dest: (names, spec.name) for dest, (names, spec) in FLAGS.items()}
# The round's flags -> their names in the flat round settings, whose defaults are the model's
# (rlr_core/training/defaults.py: the table the app's Train tab and /train_start use).
ROUND_FLAGS = {"estimator": "estimator", "steps": "steps", "batch": "batch_size", "lr": "learning_rate",
               "lora_rank": "lora_rank", "sampling_steps": "sampling_steps", "guidance": "guidance",
               "anchor_kl": "anchor_kl", "kl_reference": "kl_reference"}
MODEL_DEFAULT = " (default: the model's, rlr_core/training/defaults.py)"


def _given(args: argparse.Namespace, estimator: str) -> dict[str, Any]:
    """The options of ``estimator`` set by a flag (the flags of other estimators are ignored)."""
    fields = {s.name for s in options_schema(ESTIMATORS[estimator])}
    given = {FLAGS[dest][1].name: getattr(args, dest) for dest in FLAGS
             if FLAGS[dest][1].name in fields and getattr(args, dest, None) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}  # --window A B: a pair


def estimator_options(args: argparse.Namespace, estimator: str | None = None) -> dict:
    """The settings of the chosen estimator from the flags given that apply to it; what is not
    given takes the estimator's own default."""
    name = estimator or args.estimator or DEFAULTS["estimator"]
    return drop_implicit(ESTIMATORS[name], _given(args, name))


def train_config(args: argparse.Namespace, defaults: dict[str, Any]) -> TrainConfig:
    """The round this command runs: the flags given, and for what they leave out ``defaults``, the
    model's round defaults (:func:`rlr_core.training.defaults.defaults_for`), as the app reads them."""
    given = {key: getattr(args, dest) for dest, key in ROUND_FLAGS.items() if getattr(args, dest) is not None}
    d = {**defaults, **given}
    cls = ESTIMATORS[d["estimator"]]
    own = _given(args, d["estimator"])
    d.update({s.public: own.pop(s.name) for s in options_schema(cls) if s.public is not None and s.name in own})
    options = {**from_public(cls, d, d["sampling_steps"]), **own}  # the app's reading, then the CLI's own
    prompts = args.prompts_file.read_text().splitlines() if args.prompts_file else args.prompts
    return TrainConfig(
        estimator=EstimatorConfig(d["estimator"], options), steps=d["steps"], batch=d["batch_size"],
        prompts=[p for p in prompts if p.strip()],
        sampler=SamplerSettings(d["sampling_steps"], args.eta, d["guidance"]),
        finetune=args.finetune, lora_rank=d["lora_rank"], lora_alpha=args.lora_alpha, lr=d["learning_rate"],
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, anchor_kl=d["anchor_kl"],
        kl_reference=d["kl_reference"])


def _parser(spec: OptionSpec):
    """An argparse ``type`` that checks one value against the option's schema."""
    item = dataclasses.replace(spec, count=1)

    def parse(text: str) -> Any:
        try:
            return item.check(text)
        except OptionError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = spec.label
    return parse


def _add_option(group: argparse._ArgumentGroup, dest: str, names: tuple[str, ...], spec: OptionSpec) -> None:
    """One estimator option's flag: its type, choices and help from the schema."""
    who = "any estimator" if len(names) == len(ESTIMATORS) else "/".join(names)
    defaults = {n: dict((s.name, s.default) for s in options_schema(ESTIMATORS[n]))[spec.name] for n in names}
    shown = ""
    if len(set(map(repr, defaults.values()))) > 1:
        shown = " (default: " + ", ".join(f"{v} for {n}" for n, v in defaults.items()) + ")"
    elif spec.public is not None:  # a round setting: the model's (the table the app uses)
        shown = MODEL_DEFAULT
    elif spec.default is not None and spec.kind is not bool:
        shown = f" (default: {spec.default})"
    kw: dict[str, Any] = {"dest": dest, "default": None, "help": f"{who}: {spec.help}{shown}"}
    if spec.kind is bool:
        kw["action"] = "store_true"
    elif spec.choices:
        kw["choices"] = list(spec.choices)
    else:
        kw["type"] = _parser(spec)
        if spec.count == 2:
            kw.update(nargs=2, metavar=("A", "B"))
    group.add_argument(f"--{spec.flag}", **kw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlr_core.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("estimator")
    presets = {preset.estimator.name for preset in PRESETS.values()}  # reached with --preset
    g.add_argument("--estimator", default=None, choices=[n for n in ESTIMATORS if n not in presets],
                   help="the gradient estimator" + MODEL_DEFAULT)
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a named recipe that sets the estimator and the sampler's eta. authors-code: "
                   + PRESETS["authors-code"].summary)
    for dest, (names, spec) in FLAGS.items():
        _add_option(g, dest, names, spec)
    g = p.add_argument_group("round")
    g.add_argument("--steps", type=int, help="optimiser steps" + MODEL_DEFAULT)
    g.add_argument("--batch", type=int, help="trajectories per step" + MODEL_DEFAULT)
    g.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    g.add_argument("--prompts-file", type=Path, help="one prompt per line (overrides --prompts)")
    g.add_argument("--reward", default="fidelity",
                   help="fidelity | prefer-large | prefer-small | prefer-<attr>:<value> | a+b")
    g.add_argument("--lr", type=float, help="AdamW learning rate" + MODEL_DEFAULT)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0)
    g.add_argument("--finetune", default="lora", choices=["lora", "full"])
    g.add_argument("--lora-rank", type=int, help="LoRA rank" + MODEL_DEFAULT)
    g.add_argument("--lora-alpha", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--anchor-kl", type=float, help="beta_a: the KL to the parent on the model's anchor prompts "
                   "(prior preservation; 0: off)" + MODEL_DEFAULT)
    g.add_argument("--kl-reference", choices=KL_REFERENCES, help="what the KL terms measure against: the "
                   "version the round starts from, or the base model" + MODEL_DEFAULT)
    g = p.add_argument_group("model and sampler")
    g.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="built-in model folder")
    g.add_argument("--latent-model", default=None, help="a Stable-Diffusion-like pipeline folder or id instead")
    g.add_argument("--perception", type=Path, default=None, help="perception model folder (rewards)")
    g.add_argument("--start-from", type=Path, default=None, help="a version folder to continue from")
    g.add_argument("--sampling-steps", type=int, help="K, the sampler's steps" + MODEL_DEFAULT)
    g.add_argument("--eta", type=float, default=1.0)
    g.add_argument("--guidance", type=float, help="classifier-free guidance (1: off)" + MODEL_DEFAULT)
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
    config = train_config(args, defaults_for(backend))  # the model's defaults, as the app has them
    if args.preset:
        config = apply_preset(config, args.preset)
        if args.kl_coef:
            config.estimator.options["kl_coef"] = args.kl_coef
        print(f"preset {args.preset}: {PRESETS[args.preset].summary}")
    bar = tqdm(total=config.steps, desc=f"{config.estimator.name} round", disable=not accelerator.is_main_process)

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
