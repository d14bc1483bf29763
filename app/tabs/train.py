"""Train: start, watch and stop a fine-tuning round; it runs in the background worker."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from app.errors import user_errors
from app.round_config import ANCHOR_ROWS, ESTIMATOR_CHOICES, PUBLIC_OPTIONS, RoundConfig, defaults_note
from app.services import AppServices
from app.tabs.common import PRIVATE, QUICK, Session

INTRO = ("A round fits the reward proxy to everyone's ratings and comparisons, then fine-tunes a LoRA "
         "adapter on the prompts people used (with their prompt-lab stage prompts) to raise the proxy's "
         "reward. The page stays usable while it runs: keep rating in other tabs.")
POLL_SECONDS = 1.0


# The estimators' options among the round settings, from their schemas (rlr_core/estimators/schema.py):
# those of some estimators (RLR's block and rest, truncated backprop's K'), shown while one of them
# is chosen, and those every estimator takes (the KL), always shown.
ESTIMATOR_LABELS = {value: label for label, value in ESTIMATOR_CHOICES}
SHARED_OPTIONS = [k for k, (_, names) in PUBLIC_OPTIONS.items() if set(ESTIMATOR_LABELS) <= set(names)]
OWN_OPTIONS = [k for k in PUBLIC_OPTIONS if k not in SHARED_OPTIONS]

# The round settings the form sends (app/round_config.py's public names) -> their elements.
FORM_IDS: dict[str, str] = {
    "estimator": "train-estimator",
    "steps": "train-steps",
    "batch_size": "train-batch",
    "sampling_steps": "train-sampling-steps",
    "learning_rate": "train-lr",
    "lora_rank": "train-rank",
    **{key: f"train-{key.replace('_', '-')}" for key in OWN_OPTIONS},
    "max_prompts": "train-prompts",
    "guidance": "train-guidance",
    "sample_steps": "train-sample-steps",
    "uncertainty_penalty": "train-penalty",
    "patience": "train-patience",
    **{key: f"train-{key.replace('_', '-')}" for key in SHARED_OPTIONS},
    "fidelity_weight": "train-fidelity-weight",
    "kl_reference": "train-kl-reference",
    "anchor_kl": "train-anchor-kl",
    "anchor_fidelity": "train-anchor-fidelity",
    "fidelity_threshold": "train-fidelity-threshold",
    "fidelity_check_every": "train-fidelity-every",
    "fidelity_backoff": "train-fidelity-backoff",
    "fidelity_probe_images": "train-fidelity-probe-images",
    "fidelity_probe_prompts": "train-fidelity-probe-prompts",
    "fidelity_rule": "train-fidelity-rule",
    "normalize_reward": "train-normalize-reward",
}


def option_widget(key: str, d: dict[str, Any]) -> gr.components.Component:
    """The widget of one estimator option: kind, range, label and help from its schema; the
    model's default (as /train_start has it)."""
    spec, names = PUBLIC_OPTIONS[key]
    own = [ESTIMATOR_LABELS[n] for n in names if n in ESTIMATOR_LABELS]
    common = {"label": spec.label if key in SHARED_OPTIONS else f"{' / '.join(own)}: {spec.label}",
              "info": spec.help, "elem_id": FORM_IDS[key], "visible": key in SHARED_OPTIONS or d["estimator"] in names}
    if spec.choices:
        return gr.Dropdown(list(spec.choices), value=d[key], **common)
    if spec.words:  # a number or a word ("auto": the longest block that fits in memory)
        return gr.Dropdown([*spec.words, *map(str, spec.examples)], allow_custom_value=True, value=str(d[key]),
                           **common)
    return gr.Number(value=d[key], precision=0 if spec.kind is int else None, minimum=spec.low, maximum=spec.high,
                     **common)


def shown_options(estimator: str) -> list[dict[str, Any]]:
    """Show the chosen estimator's own options, hide the others'."""
    return [gr.update(visible=estimator in PUBLIC_OPTIONS[key][1]) for key in OWN_OPTIONS]


def progress_html(status: dict[str, Any]) -> str:
    pct = int(round(100 * status["progress"]))
    state = status["state"]
    colour = {"failed": "#d9534f", "stopped": "#f0ad4e", "finished": "#5cb85c"}.get(state, "#4a7bd0")
    text = html.escape(status["message"] or state)
    return (f'<div class="rlr-progress" data-state="{state}"><div class="rlr-bar" '
            f'style="width:{pct}%;background:{colour}"></div></div>'
            f'<div class="rlr-progress-text"><b>{html.escape(state)}</b> · {pct}% · {text}</div>')


REWARD_SERIES = {"reward": "proxy reward", "penalised": "penalised: reward - λ·spread"}


def plots(history: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The reward plot's rows (step, reward, series: the proxy's reward and the penalised one the
    round maximises and stops on), the uncertainty plot's and the fidelity plot's (the judge on
    the round's own samples)."""
    # Numeric dtypes matter: an object column (a None among the floats) becomes a categorical axis.
    frame = pd.DataFrame(history, columns=["step", "reward", "penalised", "uncertainty", "fidelity"]).apply(
        pd.to_numeric, errors="coerce")
    rewards = [frame[["step", col]].dropna().astype(float).rename(columns={col: "reward"}).assign(series=label)
               for col, label in REWARD_SERIES.items()]
    return (pd.concat(rewards, ignore_index=True), frame[["step", "uncertainty"]].dropna().astype(float),
            frame[["step", "fidelity"]].dropna().astype(float))


def summary(status: dict[str, Any]) -> str:
    lines = []
    if status.get("round_id"):
        lines.append(f"Round **{status['round_id']}** · estimator **{status.get('estimator', '?')}**")
    acc = status.get("proxy_heldout_accuracy")
    if "proxy_heldout_accuracy" in status:
        acc_text = f"{acc:.0%}" if acc is not None else "n/a (too few comparisons to hold some out)"
        lines.append(f"Reward proxy held-out accuracy: **{acc_text}** on {status.get('proxy_heldout_pairs', 0)} "
                     f"pairs ({status.get('proxy_comparisons', 0)} comparisons, "
                     f"{status.get('proxy_ratings', 0)} ratings)")
    if status.get("window"):
        a, b = status["window"]
        lines.append(f"HO block restricted to the **{status.get('focus_stage')}** stage: k = {a} .. {b}")
    if status.get("seed") is not None:
        lines.append(f"Seed **{status['seed']}** (start a round with it to replay this one on the same data)")
    if status.get("plateau_stopped_at"):
        lines.append(f"The penalised reward stopped rising: the round ended early at step "
                     f"{status['plateau_stopped_at']}.")
    if status.get("fidelity_stopped_at"):
        lines.append(f"Probe fidelity fell past the threshold at step {status['fidelity_stopped_at']}: the round "
                     "ended there, with the adapter of the last step that passed.")
    if status.get("fidelity_note"):
        mark = "⚠️ " if status.get("fidelity_flagged") else ""
        lines.append(f"{mark}Fidelity guard: {status['fidelity_note']}.")
    if status.get("version_name"):
        lines.append(f"Made **{status['version_name']}**; its samples are in the rating queue and "
                     f"{status.get('before_after_pairs', 0)} before/after pairs in the comparison queue.")
    if status.get("error"):
        lines.append(f"⚠️ {status['error']}")
    return "  \n".join(lines)


def guard_note(judge: Any) -> str:
    """How this model's rounds are kept from losing the prompt, and what the guard cannot see."""
    if judge is None:
        return ("⚠️ **Prompt fidelity is not guarded on this model**: it has no fidelity judge (for Stable "
                "Diffusion and AnimateDiff, start the app with `--reward-encoder clip:<CLIP model>`).")
    note = (f"After every round a fidelity guard ({judge.name}) judges the new version, its parent and the base "
            "model on fixed probe prompts; a version that falls past the threshold is flagged and not made active.")
    if judge.differentiable:
        note += (" The fidelity weight trains against this same judge, and a round that climbed it can read to it as "
                 "more faithful than it is")
        if getattr(judge, "confidence", 0.0):
            note += f"; the guard counts only the attributes the judge reads with p ≥ {judge.confidence:g}"
            if getattr(judge, "presence", None) is not None:
                note += (", and a shape's kind, colour, size and position only where a shape is shown at all "
                         "(a speck is none)")
        note += " (docs/benchmarks.md, \"The guard's judge against the pixels\")."
    return note


def prompts_table(status: dict[str, Any]) -> pd.DataFrame:
    rows = [{"prompt": p["prompt"], "stage prompts": " → ".join(p["stages"]) if p.get("stages") else "",
             "source": p.get("source", "")} for p in status.get("prompts", [])]
    return pd.DataFrame(rows, columns=["prompt", "stage prompts", "source"])


def build(services: AppServices, session: Session) -> gr.Timer:
    d = services.round_defaults
    with gr.Column(elem_id="train-panel"):
        gr.Markdown(f"{INTRO} {defaults_note(services.model)} {guard_note(services.fidelity_judge)}")
        form: dict[str, Any] = {}  # public setting name -> its widget
        with gr.Row():
            estimator = form["estimator"] = gr.Dropdown(ESTIMATOR_CHOICES, value=d["estimator"],
                                                        label="Gradient estimator", elem_id=FORM_IDS["estimator"],
                                                        scale=2)
            form["steps"] = gr.Number(value=d["steps"], precision=0, label="Optimiser steps", minimum=1,
                                      elem_id=FORM_IDS["steps"])
            form["batch_size"] = gr.Number(value=d["batch_size"], precision=0, label="Batch size", minimum=2,
                                           elem_id=FORM_IDS["batch_size"])
            form["sampling_steps"] = gr.Number(value=d["sampling_steps"], precision=0, label="Sampling steps",
                                               minimum=3, elem_id=FORM_IDS["sampling_steps"])
            form["learning_rate"] = gr.Number(value=d["learning_rate"], label="Learning rate",
                                              elem_id=FORM_IDS["learning_rate"])
        with gr.Accordion("More settings", open=False):
            with gr.Row():
                form["lora_rank"] = gr.Number(value=d["lora_rank"], precision=0, label="LoRA rank",
                                              elem_id=FORM_IDS["lora_rank"])
                for key in OWN_OPTIONS:  # the chosen estimator's own options
                    form[key] = option_widget(key, d)
                form["max_prompts"] = gr.Number(value=d["max_prompts"], precision=0, label="Prompts per round",
                                                elem_id=FORM_IDS["max_prompts"])
                form["guidance"] = gr.Number(value=d["guidance"], label="Guidance while training (1 = off, 2x faster)",
                                             elem_id=FORM_IDS["guidance"])
                form["sample_steps"] = gr.Number(value=d["sample_steps"], precision=0,
                                                 label="New version's samples: steps", elem_id=FORM_IDS["sample_steps"])
                form["uncertainty_penalty"] = gr.Number(
                    value=d["uncertainty_penalty"], minimum=0, label="Uncertainty penalty λ",
                    info="maximise reward - λ·(proxy ensemble spread); 0 = off",
                    elem_id=FORM_IDS["uncertainty_penalty"])
                form["patience"] = gr.Number(value=d["patience"], precision=0, minimum=0, label="Early-stop patience",
                                             info="steps without a new best penalised reward; 0 = never stop early",
                                             elem_id=FORM_IDS["patience"])
                for key in SHARED_OPTIONS:  # every estimator's (the KL to the round's parent)
                    form[key] = option_widget(key, d)
                form["kl_reference"] = gr.Dropdown(
                    choices=[("the round's parent", "parent"), ("the base model", "base")], value=d["kl_reference"],
                    label="KL measured against", elem_id=FORM_IDS["kl_reference"],
                    info="the parent: each round may move as far from the last; the base: every round's change "
                         "so far is charged, so drift cannot add up (LoRA rounds)")
                judged = services.fidelity_judge is not None and services.fidelity_judge.differentiable
                weight_info = ("maximise reward + w·(prompt fidelity); the guard reads the same judge" if judged
                               else "this model has no differentiable fidelity judge")
                form["fidelity_weight"] = gr.Number(value=d["fidelity_weight"], minimum=0, label="Fidelity weight w",
                                                    info=weight_info,
                                                    interactive=judged, elem_id=FORM_IDS["fidelity_weight"])
                anchored = services.model.anchor_prompts > 0
                form["anchor_kl"] = gr.Number(
                    value=d["anchor_kl"], minimum=0, label="Anchor KL β_a", interactive=anchored,
                    info=(f"the KL to the parent also on {services.model.anchor_prompts} fully specified "
                          "prompts the round does not train on, so its change stays where the prompts leave room; "
                          "0 = off" if anchored else "this model has no anchor prompts"),
                    elem_id=FORM_IDS["anchor_kl"])
                form["anchor_fidelity"] = gr.Number(
                    value=d["anchor_fidelity"], minimum=0, label="Anchor fidelity w_a",
                    interactive=anchored and judged,
                    info=(f"each batch also trains {ANCHOR_ROWS} rows on the anchor prompts, rewarded by "
                          "w_a·(prompt fidelity) alone, so the round learns to keep what a prompt names; 0 = off"
                          if anchored and judged else "this model has no anchor prompts or no differentiable judge"),
                    elem_id=FORM_IDS["anchor_fidelity"])
                form["fidelity_threshold"] = gr.Number(
                    value=d["fidelity_threshold"], minimum=0, maximum=1, label="Fidelity guard threshold",
                    info="a version this far below its parent or the base is flagged; 0 = off",
                    elem_id=FORM_IDS["fidelity_threshold"])
                form["fidelity_check_every"] = gr.Number(
                    value=d["fidelity_check_every"], precision=0, minimum=0, label="Check fidelity every N steps",
                    info="inside the round; on a drop, back to the last good step; 0 = off",
                    elem_id=FORM_IDS["fidelity_check_every"])
                form["fidelity_backoff"] = gr.Number(
                    value=d["fidelity_backoff"], precision=0, minimum=0, maximum=6, label="Fidelity back-off",
                    info="a flagged version is scaled back toward its parent, halving the round's change up to N "
                         "times, and judged again; the first that passes goes live; 0 = off",
                    elem_id=FORM_IDS["fidelity_backoff"])
                form["fidelity_probe_images"] = gr.Number(
                    value=d["fidelity_probe_images"], precision=0, minimum=1, maximum=16,
                    label="Fidelity guard images per probe prompt",
                    info="more: less noise in the verdict, a longer round (about 0.3 s an image on 2 CPU cores); "
                         "4 kept fidelity no better than 2 on the loop benchmark",
                    elem_id=FORM_IDS["fidelity_probe_images"])
                form["fidelity_probe_prompts"] = gr.Number(
                    value=d["fidelity_probe_prompts"], precision=0, minimum=4, maximum=64,
                    label="Fidelity guard probe prompts",
                    info="at most: the round's prompts, then prompts nobody rated (the model's held-out ones); "
                         "each costs its images of the new version",
                    elem_id=FORM_IDS["fidelity_probe_prompts"])
                form["fidelity_rule"] = gr.Dropdown(
                    choices=[("Mean, and the round's and the held-out prompts apart", "split"),
                             ("Mean over the attributes the prompts name", "attributes")],
                    value=d["fidelity_rule"], label="Fidelity guard rule",
                    info="how a drop is read: a loss on either group counts, or every named attribute weighs alike",
                    elem_id=FORM_IDS["fidelity_rule"])
                form["normalize_reward"] = gr.Checkbox(
                    value=d["normalize_reward"], label="Reward in units of its spread",
                    info="divide the proxy's reward by its spread over the rated images, so the KL and the "
                         "fidelity weight hold it back as much in every round",
                    elem_id=FORM_IDS["normalize_reward"])
        with gr.Row():
            start = gr.Button("Start a round", variant="primary", elem_id="train-start")
            stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            auto = gr.Number(value=services.state.get().auto_train_every, precision=0, minimum=0,
                             label="Train automatically every N new judgements (0 = off)", elem_id="train-auto")
        bar = gr.HTML(progress_html(services.rounds.status()), elem_id="train-progress")
        info = gr.Markdown(elem_id="train-summary")
        with gr.Row():
            reward_plot = gr.LinePlot(x="step", y="reward", color="series", title="Proxy reward of the round's samples",
                                      height=260, elem_id="train-reward-plot")
            unc_plot = gr.LinePlot(x="step", y="uncertainty", title="Proxy uncertainty (ensemble spread)",
                                   height=260, elem_id="train-uncertainty-plot")
            fid_plot = gr.LinePlot(x="step", y="fidelity", title="Prompt fidelity (judge)",
                                   height=260, elem_id="train-fidelity-plot")
        used = gr.Dataframe(headers=["prompt", "stage prompts", "source"], label="Prompts this round trains on",
                            interactive=False, elem_id="train-prompts-used", wrap=True)
        timer = gr.Timer(POLL_SECONDS)
        seen = gr.State(None)  # what the page shows, to skip re-sending unchanged plots

    setting_inputs = list(form.values())

    @user_errors
    def on_start(*values):
        *settings, password = values
        config = RoundConfig.parse(dict(zip(form, settings)), services.round_defaults)
        services.rounds.start(config, password)
        gr.Info("Training round started: watch it here, keep rating elsewhere.")
        return poll(None)

    @user_errors
    def on_stop(password):
        if not services.rounds.stop(password):
            gr.Info("No round is running.")
        return poll(None)

    @user_errors
    def on_auto(every, password):
        services.rounds.set_auto_train(every, password)

    def poll(last: Any):
        status = services.rounds.status()
        key = (status.get("job_id"), status["state"], round(status["progress"], 3), len(status["history"]),
               status["message"])
        if key == last:
            return (gr.skip(),) * 6 + (last,)
        rewards, spread, fidelity = plots(status["history"])
        return progress_html(status), summary(status), rewards, spread, fidelity, prompts_table(status), key

    poll_outputs = [bar, info, reward_plot, unc_plot, fid_plot, used, seen]
    start.click(on_start, [*setting_inputs, session.password], poll_outputs, **QUICK, **PRIVATE)
    stop.click(on_stop, session.password, poll_outputs, **QUICK, **PRIVATE)
    auto.submit(on_auto, [auto, session.password], None, **QUICK, **PRIVATE)
    auto.blur(on_auto, [auto, session.password], None, **QUICK, **PRIVATE)
    timer.tick(poll, seen, poll_outputs, **QUICK, **PRIVATE)
    estimator.change(shown_options, estimator, [form[key] for key in OWN_OPTIONS], **QUICK, **PRIVATE)
    return timer
