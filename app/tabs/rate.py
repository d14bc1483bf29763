"""Generate & rate: draw samples, see each with its model version, rate it with 1-5 stars."""

from __future__ import annotations

import random

import gradio as gr

from app.errors import user_errors
from app.services import AppServices
from app.services.generation import MAX_IMAGES, MAX_SEED
from app.tabs.common import MODEL, PRIVATE, QUICK, Session, sample_caption, stars_text
from rlr_core.images import display_height

HELP = ("**Keys:** `1`-`5` rate the big image · `←` `→` previous / next. "
        "Click a thumbnail to pick it. *Load my queue* brings samples you have not rated yet, "
        "newest model version first.")


def build(services: AppServices, session: Session) -> None:
    batch = gr.State([])  # sample ids shown in the gallery
    cursor = gr.State(0)  # index of the sample shown big
    view_height = display_height(services.model.image_size)
    examples = list(services.model.example_prompts)
    things = services.model.noun(plural=True).capitalize()  # Images or Clips (they loop)
    with gr.Column(elem_id="rate-panel"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=examples[0], elem_id="prompt", scale=5,
                                max_length=10_000)
            go = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        note = gr.Markdown(services.prompts.describe(examples[0]), elem_id="prompt-note")
        with gr.Row():
            n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label=things, elem_id="n-images")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed", minimum=0, maximum=MAX_SEED)
            dice = gr.Button("New seed", size="sm", scale=0, elem_id="new-seed")
            steps = gr.Slider(2, 100, value=20, step=1, label="Sampling steps", elem_id="steps")
            guidance = gr.Slider(1.0, 8.0, value=3.0, step=0.5, label="Guidance")
        gr.Examples(examples, inputs=prompt, label="Try")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                gallery = gr.Gallery(label=f"{things} (model version · sample id · your stars)", columns=4,
                                     format="png", allow_preview=False, object_fit="contain",
                                     elem_id="gallery")
                load_queue = gr.Button("Load my queue (unrated samples)", elem_id="load-queue")
            with gr.Column(scale=2, elem_id="rating-box"):
                current = gr.Image(label="Rate this sample", height=view_height, interactive=False,
                                   elem_id="current", elem_classes="pixelated", buttons=[])
                info = gr.Markdown("Generate samples or load your queue to start rating.",
                                   elem_id="current-info")
                with gr.Row():
                    star_buttons = [gr.Button(f"{k} {'★' * k}", elem_id=f"star-{k}", size="sm", min_width=60)
                                    for k in range(1, 6)]
                with gr.Row():
                    prev = gr.Button("← Previous", elem_id="prev-sample", size="sm")
                    nxt = gr.Button("Next →", elem_id="next-sample", size="sm")
        gr.Markdown(HELP)

    def render(ids: list[int], index: int, rater: str) -> tuple:
        if not ids:
            return [], None, "Nothing to rate here yet.", 0
        index = min(max(index, 0), len(ids) - 1)
        samples = [services.generation.sample(i) for i in ids]
        name = (rater or "").strip()
        stars = [services.judgements.my_rating(s["sample_id"], name) if name else None for s in samples]
        # Copies outside the data folder (app/files.py): Gradio never gets a data-folder path.
        items = [(services.images.copy(s["image_file"]), ("▶ " if i == index else "") + sample_caption(s, st))
                 for i, (s, st) in enumerate(zip(samples, stars))]
        s = samples[index]
        text = (f"**{index + 1} / {len(ids)}** · sample {s['sample_id']} · model **{s['version']}** · "
                f"seed {s['seed']}  \n*{s['prompt']}*  \nyour rating: {stars_text(stars[index])}")
        return items, services.images.copy(s["image_file"]), text, index

    outputs = [gallery, current, info, cursor]

    @user_errors
    def on_generate(text: str, count: float, seed_value: float, n_steps: float, g: float, rater: str):
        samples = services.generation.generate(text, count, seed_value, n_steps, g)
        return ([s["sample_id"] for s in samples], *render([s["sample_id"] for s in samples], 0, rater))

    @user_errors
    def on_queue(rater: str):
        samples = services.judgements.to_rate(rater, MAX_IMAGES)
        ids = [s["sample_id"] for s in samples]
        if not ids:
            gr.Info("You have rated every sample. Generate more, or wait for the next model version.")
        return (ids, *render(ids, 0, rater))

    @user_errors  # a damaged image file shows a message
    def on_select(ids: list[int], rater: str, evt: gr.SelectData):
        return render(ids, evt.index, rater)

    def move(step: int):
        @user_errors
        def handler(ids: list[int], index: int, rater: str):
            return render(ids, index + step, rater)
        return handler

    def rate_with(stars: int):
        @user_errors
        def handler(ids: list[int], index: int, rater: str):
            if not ids:
                raise gr.Error("Nothing to rate yet: generate samples or load your queue first.")
            services.judgements.rate(ids[min(index, len(ids) - 1)], rater, stars)
            return render(ids, index + 1 if index + 1 < len(ids) else index, rater)
        return handler

    @user_errors
    def check_request(text: str, count: float, seed_value: float, n_steps: float, g: float, rater: str) -> None:
        services.generation.check_generation(text, count, seed_value, n_steps, g)

    # Check first (quick, no outputs): a bad prompt then shows a message and leaves the gallery as is.
    gen_inputs = [prompt, n, seed, steps, guidance, session.rater]
    for trigger in (go.click, prompt.submit):
        trigger(check_request, gen_inputs, None, **QUICK, **PRIVATE).success(
            on_generate, gen_inputs, [batch, *outputs], **MODEL, **PRIVATE)
    prompt.change(services.prompts.describe, prompt, note, **QUICK, **PRIVATE)
    dice.click(lambda: random.randint(0, 99_999), None, seed, **QUICK, **PRIVATE)
    load_queue.click(on_queue, session.rater, [batch, *outputs], **QUICK, **PRIVATE)
    gallery.select(on_select, [batch, session.rater], outputs, **QUICK, **PRIVATE)
    prev.click(move(-1), [batch, cursor, session.rater], outputs, **QUICK, **PRIVATE)
    nxt.click(move(+1), [batch, cursor, session.rater], outputs, **QUICK, **PRIVATE)
    for k, button in enumerate(star_buttons, start=1):
        button.click(rate_with(k), [batch, cursor, session.rater], outputs,
                     **QUICK, **PRIVATE)

