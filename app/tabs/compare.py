"""Compare: two samples of one prompt side by side; which is better? (Blind: no versions shown.)"""

from __future__ import annotations

import time
import uuid
from typing import Any

import gradio as gr

from app.errors import user_errors
from app.services import AppServices
from app.tabs.common import PRIVATE, QUICK, Session
from rlr_core.images import display_height

HELP = ("**Keys:** `←` left is better · `→` right is better · `↑` both good · `↓` both bad · `S` skip. "
        "Pairs come from the reward proxy's active selection (where it is least sure); before/after "
        "pairs of a new model version come first. Your response time is recorded.")
BUTTONS = [("← Left is better", "left", "cmp-left"), ("↑ Both good", "tie-both-good", "cmp-both-good"),
           ("↓ Both bad", "tie-both-bad", "cmp-both-bad"), ("Skip (S)", "skip", "cmp-skip"),
           ("Right is better →", "right", "cmp-right")]


def build(services: AppServices, session: Session, tab: gr.Tab) -> None:
    pair = gr.State(None)  # {"left": id, "right": id, "shown_at": time, "token": str}
    height = max(300, display_height(services.model.image_size))
    with gr.Column(elem_id="compare-panel"):
        question = gr.Markdown("Press *Load a pair* to start.", elem_id="cmp-prompt")
        with gr.Row():
            left = gr.Image(label="Left", height=height, interactive=False, elem_id="cmp-left-img",
                            elem_classes="pixelated", buttons=[])
            right = gr.Image(label="Right", height=height, interactive=False, elem_id="cmp-right-img",
                             elem_classes="pixelated", buttons=[])
        with gr.Row():
            buttons = [(gr.Button(label, elem_id=eid, variant="primary" if outcome in ("left", "right")
                                  else "secondary"), outcome) for label, outcome, eid in BUTTONS]
        with gr.Row():
            count = gr.Markdown(elem_id="cmp-count")
            load = gr.Button("Load a pair", size="sm", elem_id="cmp-next", scale=0)
        gr.Markdown(HELP)

    def counts_text(rater: str) -> str:
        c = services.judgements.comparison_counts((rater or "").strip() or None)
        return f"**{c['my_comparisons']}** comparisons by you · **{c['all_comparisons']}** by everyone"

    def show_next(rater: str) -> tuple[Any, ...]:
        nxt = services.judgements.next_pair(rater)
        if nxt is None:
            return (None, "Nothing left to compare for you: generate more samples (two or more of one "
                    "prompt make a pair).", None, None, counts_text(rater))
        state = {"left": nxt["left"]["sample_id"], "right": nxt["right"]["sample_id"],
                 "shown_at": time.time(), "token": uuid.uuid4().hex}
        what = services.model.noun()
        return (state, f"Which {what} fits **{nxt['prompt']}** better?",
                services.images.copy(nxt["left"]["image_file"]), services.images.copy(nxt["right"]["image_file"]),
                counts_text(rater))

    outputs = [pair, question, left, right, count]

    @user_errors
    def on_load(rater: str):
        return show_next(rater)

    def answer(outcome: str):
        @user_errors
        def handler(state: dict | None, rater: str):
            if not state:
                raise gr.Error("No pair is shown: press Load a pair first.")
            elapsed = time.time() - state["shown_at"]
            services.judgements.compare(state["left"], state["right"], outcome, rater, response_time_s=elapsed,
                             submission_id=f"{state['token']}-{outcome}")
            return show_next(rater)
        return handler

    @user_errors
    def on_enter(state: dict | None, rater: str):
        return show_next(rater) if not state else (gr.skip(),) * 4 + (counts_text(rater),)

    load.click(on_load, session.rater, outputs, **QUICK, **PRIVATE)
    tab.select(on_enter, [pair, session.rater], outputs, **QUICK, **PRIVATE)
    for button, outcome in buttons:
        button.click(answer(outcome), [pair, session.rater], outputs, **QUICK, **PRIVATE)
