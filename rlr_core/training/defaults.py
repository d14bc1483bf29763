"""A round's default settings on each model: one table, read by every entry point.

The Train tab's form, ``/train_start`` with settings left out, auto-train and the command line
(``python -m rlr_core.training``) all start from :func:`defaults_for` the loaded backend: the
flat round settings of :data:`DEFAULTS` (the app's public names) with its family's row of
:data:`FAMILY_DEFAULTS` on top. The estimators' own options among them (``block``, ``rest``,
``truncation``, ``kl_coef``) take their defaults from the estimators' dataclasses
(rlr_core/estimators/schema.py), except where :data:`OPTION_PICK` says otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlr_core.estimators import ESTIMATORS
from rlr_core.estimators.schema import public_options

if TYPE_CHECKING:
    from rlr_core.backends.base import DiffusionBackend

# The estimators' options in the flat settings: key -> (spec, the estimators that take it).
PUBLIC_OPTIONS = public_options(ESTIMATORS.values())
_SHARED = [k for k, (_, names) in PUBLIC_OPTIONS.items() if len(names) == len(ESTIMATORS)]  # every one's (the KL)
# Where a round's default differs from the estimator's own: truncated backprop through the last 3
# steps (the round form's default since its first version; the dataclass's 1 is DRaFT-1).
OPTION_PICK: dict[str, Any] = {"truncation": 3}
_OPTIONS = {k: OPTION_PICK.get(k, spec.default) for k, (spec, _) in PUBLIC_OPTIONS.items()}

# Rows each training batch adds from the anchor prompts when anchor_fidelity is on: a third of the
# built-in image model's batch of 6, so a round costs a third more.
ANCHOR_ROWS = 2

# The flat settings' defaults, in the order the API has always answered with.
DEFAULTS: dict[str, Any] = {
    "estimator": "rlr",
    "steps": 20,
    # 8, not 4: at batch 4 the built-in model's rounds lowered the reward as often as they raised
    # it (observed while developing, when RLR's likelihood-ratio terms still used the leave-one-out
    # mean, not recorded in bench/results; RLR's default baseline is now "state"). The built-in
    # image model's rounds run at 6 (BUILTIN_IMAGE_PICK, measured on the loop).
    "batch_size": 8,
    "sampling_steps": 10,
    "learning_rate": 3e-3,
    "lora_rank": 4,
    # The estimators' own options (RLR's HO block length h and rest-of-chain term, truncated
    # backprop's last K' steps), from their dataclasses.
    **{k: v for k, v in _OPTIONS.items() if k not in _SHARED},
    "max_prompts": 8,
    # 1 = no classifier-free guidance while training: half the cost, and the adapter carries
    # over to guided sampling (it shifts the guided and the unguided prediction alike).
    "guidance": 1.0,
    "samples_per_prompt": 2,  # after the round: new-version samples per prompt (and as many pairs)
    "sample_steps": 20,  # ... drawn like the Generate tab draws (20 steps, guidance 3)
    "sample_guidance": 3.0,
    "seed": None,  # None: a new random seed each round
    # Against over-optimising the proxy: maximise r - lambda * (ensemble spread), one spread
    # below the mean (a lower confidence bound); 0 switches it off.
    "uncertainty_penalty": 1.0,
    # End the round after this many steps without a new best (smoothed) penalised reward; 0: never.
    "patience": 8,
    # Against losing what the rater cannot see (app/fidelity_guard.py, rlr_core/estimators/kl.py):
    # kl_coef, every estimator's option: beta of the exact per-step KL to the round's parent; 0: off.
    **{k: _OPTIONS[k] for k in _SHARED},
    "fidelity_weight": 0.0,  # w in reward + w * fidelity, where the backend's judge is differentiable
    # What the KL (kl_coef, anchor_kl) measures against: "parent", the version the round starts from
    # (each round may move kl-limited steps from the last); "base", the base model (the adapter
    # switched off: the change of every round so far is charged, so drift cannot add up over rounds).
    # "parent": on a screen of the loop (loop_klbase_screen.json, bold, 2 seeds) "base" held fidelity
    # on one run, let a 0.092 loss go live on the other, and pulled that run's score back in round 2.
    "kl_reference": "parent",
    # beta_a of the same KL on the model's anchor prompts (prior preservation: prompts the round does
    # not train on, every attribute named); 0: off; nothing to do on a model without anchor prompts.
    # Off: on the loop at beta_a = 3 (bench/results/loop_anchor.json) fidelity held at every round on
    # 3 runs of 6 (the default: 4) and the guard let 5 of 13 losses through: position and size are
    # settled in the first steps, where a per-step KL charges least for a change.
    "anchor_kl": 0.0,
    # w_a: each training batch also draws ANCHOR_ROWS rows from the anchor prompts, rewarded by
    # w_a * fidelity alone (prior preservation by reward, through the estimator's own gradient, so the
    # first, noisiest steps that settle position and size are charged too); needs a differentiable
    # fidelity judge and anchor prompts; 0: off. Off: on the loop at w_a = 10 (loop_anchorfid.json,
    # 2 seeds x 2 tastes) fidelity held at every round on 3 runs of 4 (the default: 2), but the
    # round-1 rise passed 3 SE on 1 (the default: 3), two losses went live, and rounds took a third longer.
    "anchor_fidelity": 0.0,
    "fidelity_threshold": 0.05,  # a version this far below its parent or the base is flagged; 0: off
    # Images per probe prompt the guard draws of the new version (and once of its parent and the
    # base). Replayed on the 48 versions two loops made (bench/results/guard_rules.json and
    # guard_rules_anchor.json), 4 caught 25 of the 28 losses against 21 at 2, with as many false
    # alarms (10 of 20 faithful versions against 9), for about 10 s more per round on 2 cores. On the
    # loop with 4 (loop_probes4.json, 3 seeds x 2 tastes) fidelity held at every round on 4 runs of 6,
    # as at 2, the round-1 rise passed 3 SE on 2 (at 2: 1), and the guard let a 0.078 loss through
    # (at 2 the largest was 0.057), with a first round of 118 s on 2 cores, not 76: it stays 2.
    "fidelity_probe_images": 2,
    # At most this many probe prompts: the round's own and their stage prompts, then the model's
    # held-out prompts (at least a quarter). Each costs fidelity_probe_images images of the new version.
    "fidelity_probe_prompts": 16,
    # How the guard reads a drop: "split", the mean over the probe prompts or either group of them
    # (the round's prompts, the held-out ones) apart; "attributes", the mean over every attribute the
    # probes name (a prompt naming four weighs four times a one-word prompt; judges without
    # attributes weigh every prompt alike).
    "fidelity_rule": "split",
    "fidelity_check_every": 10,  # probe fidelity inside the round every N steps (early stop); 0: off
    # a flagged version is scaled back toward its parent, halving the round's change, up to this
    # many times, and judged again at each; the first that passes goes live; 0: off. Off by default:
    # on the loop (bench/results/loop_backoff.json) 2 halvings let more pixel-judged losses go live
    # (the guard caught 7 of 12, against 13 of 15 without) and held fidelity on 3 runs of 6, not 4:
    # trying scales until one passes the guard's 32 noisy probe images picks the ones that slip by.
    "fidelity_backoff": 0,
    # Divide the proxy's reward by its spread over the images people judged (the proxy's report,
    # ``reward_spread``), so kl_coef and fidelity_weight weigh the same against it in every round
    # (the proxy's scale is whatever its fit made it; the fidelity term is a fraction in [0, 1]).
    # Off: on the loop (bench/results/loop_norm.json) 5 new versions of 24 lost fidelity, not 15,
    # but the stronger term climbed the guard's own judge, which caught 1 of the 5; fidelity held
    # on 4 runs of 6, as without, and the bold rater's score stayed at the base's.
    "normalize_reward": False,
}


# The built-in image model's pick, from the loop the person lives with (bench/loop.py,
# docs/benchmarks.md "The loop"; bench/results/loop_2se.json, loop_20steps.json, loop_screen.json): a
# proxy learnt from 32 ratings and 24 comparisons per round, four rounds in a row, judged from the
# pixels. Truncated backprop (the race's pick on a fixed reward) raised the bold rater's score most
# in a round (0.41 -> 0.60) but lost pixel-judged prompt fidelity (0.91 -> 0.74) and image quality
# (0.86 -> 0.68), and the guard flagged every version it made (loop_screen.json). RLR with the
# fidelity term and the KL to the round's parent keeps each round's step on the prompt and small.
# 10 steps at batch 6 and learning rate 6e-3 (loop_2se.json), not 20 at batch 8 and 3e-3
# (loop_20steps.json): about the same distance in Adam steps in half the time, and the round-1 rise
# passed 3 SE on 3 runs of 6 instead of 1. patience 0: RLR's noisy per-step reward made the plateau
# stop end rounds early. No in-round watch: its 16 probe images stopped rounds on noise (they are
# fewer than the guard's 32) and each check costs about a tenth of a round; the guard judges the
# whole 10-step round. Measured again with the guard's presence model and fidelity checked on the
# rated and the unrated prompts apart (loop_pooled.json): the guard let 6 of 15 losses through, most
# of them on unrated prompts; with the guard also judging its rated and held-out probes apart
# (loop_split.json) it let 2 of 15 through (0.055 and 0.057) and fidelity held on 4 runs of 6, but it
# also flagged 4 of 9 faithful versions, and the round-1 rise passed 3 SE on 1 run of 6. The guard
# now probes 24 of the model's held-out prompts (32 probe prompts with the round's 8) and reads a
# drop over the attributes the probes name (loop.json): the round-1 rise passed 3 SE on 5 runs of 6,
# fidelity held on 4 runs of 6 as before, it flagged 3 of 11 faithful versions, and it let 3 of 13
# losses through (0.053-0.064). Training a third of
# each batch on the round's prompts completed at random, with the fidelity term summed over the
# named attributes, was no better there (loop_completed.json: fidelity kept on 1 run of 6), so
# neither is part of the round.
BUILTIN_IMAGE_PICK: dict[str, Any] = {"estimator": "rlr", "patience": 0, "fidelity_weight": 1.0, "kl_coef": 0.3,
                                      "steps": 10, "batch_size": 6, "learning_rate": 6e-3,
                                      "fidelity_check_every": 0, "fidelity_probe_prompts": 32,
                                      "fidelity_rule": "attributes"}
BUILTIN_IMAGE_DEFAULTS: dict[str, Any] = {**DEFAULTS, **BUILTIN_IMAGE_PICK}
# Stable Diffusion and AnimateDiff (docs/own-model.md, "Round defaults"): learning rate 3e-4, the
# top of the range docs/own-model.md recommends for a LoRA on Stable Diffusion (and DDPO's
# published SD 1.5 LoRA configuration); batch 2, the batch measured on a GPU
# (bench/results/gpu_sd15.json). No loop benchmark has been run on these models.
LATENT_PICK: dict[str, Any] = {"learning_rate": 3e-4, "batch_size": 2}
# Stable Diffusion XL (docs/own-model.md, "Stable Diffusion XL"); nothing here was measured on SDXL.
# learning rate 1e-4: the default of diffusers' SDXL LoRA training script
# (train_text_to_image_lora_sdxl.py in diffusers' examples), a peer's published configuration;
# batch 2 and block 2: the SD 1.5 choice (bench/results/gpu_sd15.json), kept for SDXL's ~3x larger
# UNet at 4x the pixels; sample_guidance 5.0: StableDiffusionXLPipeline's default guidance_scale.
# Training guidance stays 1 (DEFAULTS: half the cost, the adapter carries over to guided sampling).
SDXL_PICK: dict[str, Any] = {"learning_rate": 1e-4, "batch_size": 2, "block": 2, "sample_guidance": 5.0}
# Stable Diffusion 3 / 3.5 (docs/own-model.md, "Stable Diffusion 3"); nothing here was measured on it.
# From Flow-GRPO's SD3.5-Medium configuration (github.com/yifan123/flow_grpo, config/base.py and
# general_ocr_sd3 in config/grpo.py): learning rate 3e-4 (train.learning_rate), 10 sampling steps
# while training (sample.num_steps) and 40 to draw (sample.eval_num_steps), guidance 4.5 while
# sampling and training (sample.guidance_scale, train.cfg = True); LoRA rank 32 (their
# train_sd3.py script, r=32, lora_alpha=64: here alpha = rank; not re-checked). Their noise level 0.7 is the
# backend's (rlr_core/backends/flow_models.py, NOISE_LEVEL). Batch 2: the SD 1.5 choice, unmeasured.
SD3_PICK: dict[str, Any] = {"learning_rate": 3e-4, "lora_rank": 32, "sampling_steps": 10, "guidance": 4.5,
                            "sample_steps": 40, "sample_guidance": 4.5, "batch_size": 2}
# FLUX.1 dev / schnell (docs/own-model.md, "FLUX.1"); nothing here was measured on FLUX. From
# Flow-GRPO's FLUX.1-dev configuration (github.com/yifan123/flow_grpo, pickscore_flux in
# config/grpo.py, checked): 6 sampling steps while training (sample.num_steps) and 28 to draw
# (sample.eval_num_steps; also FluxPipeline's default num_inference_steps), guidance 3.5 in both
# (sample.guidance_scale; FluxPipeline's default guidance_scale; FLUX.1-dev's guidance is embedded,
# so it costs no second model call, and schnell ignores it); learning rate 3e-4 (train.learning_rate
# of config/base.py, not overridden there); LoRA rank 64 (flow_grpo train_flux.py: r=64,
# lora_alpha=128, on the attention and feed-forward layers; here the attention projections only and
# alpha = rank). Their noise level 0.9 is the backend's (FluxBackend.noise_level). Batch 2: the
# SD 1.5 choice, a guess for FLUX (unmeasured).
FLUX_PICK: dict[str, Any] = {"learning_rate": 3e-4, "lora_rank": 64, "sampling_steps": 6, "guidance": 3.5,
                             "sample_steps": 28, "sample_guidance": 3.5, "batch_size": 2}

# One table: a backend's ``family`` -> the settings that differ from DEFAULTS on it.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "builtin-image": BUILTIN_IMAGE_PICK,
    "builtin-clips": {},
    "stable-diffusion": LATENT_PICK,
    "animatediff": LATENT_PICK,
    "stable-diffusion-xl": SDXL_PICK,
    "stable-diffusion-3": SD3_PICK,
    "flux": FLUX_PICK,
}


def defaults_for(backend: DiffusionBackend) -> dict[str, Any]:
    """The flat round settings' defaults on this model (its family's row of :data:`FAMILY_DEFAULTS`)."""
    return {**DEFAULTS, **FAMILY_DEFAULTS.get(backend.family, {})}
