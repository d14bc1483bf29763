"""Prompt lab: Diffusive Chain-of-Thought, live (method doc section 5).

The chain draws coarse to fine, so each third of it gets its own prompt. Split a prompt, edit
the stage prompts, move the stage boundaries, and preview: the plain prompt and the stage
prompts under the same seed, each shown as what the chain has decided at the end of every stage.
"""

from __future__ import annotations

import gradio as gr

from app import video
from app.errors import user_errors
from app.services import AppServices
from app.tabs.common import MODEL, PRIVATE, QUICK, Session
from rlr_core import dcot
from rlr_core.images import display_scale, to_pil

INTRO = ("**Diffusive Chain-of-Thought.** Early sampling steps fix the layout, middle steps the shape, "
         "late steps colour and detail. Give each stage its own prompt; *Preview* shows the plain prompt "
         "(top row) and your stage prompts (bottom row) from the same noise, at the end of each stage. "
         "*Save* stores the stage prompts: training rounds then use them for this prompt. "
         "Measured on the built-in model (5 seeds; docs/benchmarks.md, race): with stage prompts and RLR's "
         "block in the coarse stage, a round reached plain RLR's gain on a composition preference with 0.8x "
         "the samples, the block's window alone did not speed it up, and stage prompts at the default "
         "boundaries lowered prompt fidelity from 1.00 to 0.60 (colour is settled before the fine stage).")
FOCUS_CHOICES = [("whole chain (default)", "all"), ("coarse: layout", "coarse"), ("mid: shape", "mid"),
                 ("fine: colour & detail", "fine")]


def build(services: AppServices, session: Session) -> None:
    lab, model = services.prompt_lab, services.model
    settings = lab.stage_settings()
    default = model.example_prompts[0]
    clips = model.is_video
    try:
        first = lab.split_prompt(default)
    except ValueError:  # a model whose prompt check refuses the example (e.g. a short token limit)
        default = ""
        first = dict.fromkeys(dcot.STAGES, "")
    with gr.Column(elem_id="lab-panel"):
        gr.Markdown(INTRO)
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=default, elem_id="lab-prompt", scale=5, max_length=10_000)
            split = gr.Button("Split into stages", elem_id="lab-split", scale=1)
        with gr.Row():
            coarse = gr.Textbox(label="Coarse stage (layout and motion: background, size, direction, speed)"
                                if clips else "Coarse stage (layout: background, position, size)",
                                value=first["coarse"], elem_id="lab-coarse")
            mid = gr.Textbox(label="Mid stage (+ what shape)", value=first["mid"], elem_id="lab-mid")
            fine = gr.Textbox(label="Fine stage (colour, every detail)", value=first["fine"],
                              elem_id="lab-fine")
        with gr.Row():
            mid_start = gr.Slider(0.05, 0.9, value=settings["boundaries"][0], step=0.05,
                                  label="Mid stage starts at (share of the chain)", elem_id="lab-mid-start")
            fine_start = gr.Slider(0.1, 0.95, value=settings["boundaries"][1], step=0.05,
                                   label="Fine stage starts at", elem_id="lab-fine-start")
            seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id="lab-seed")
            steps = gr.Slider(3, 60, value=20, step=1, label="Sampling steps", elem_id="lab-steps")
        with gr.Row():
            preview = gr.Button("Preview", variant="primary", elem_id="lab-preview")
            save = gr.Button("Save stage prompts", elem_id="lab-save")
        schedule = gr.Markdown(elem_id="lab-schedule")
        with gr.Column(elem_id="lab-gallery"):
            gallery_args = {"columns": 3, "height": 320, "format": "png", "allow_preview": False,
                            "object_fit": "contain"}
            plain_images = gr.Gallery(label="Plain prompt, same seed: end of coarse · end of mid · final",
                                      elem_id="lab-plain", **gallery_args)
            staged_images = gr.Gallery(label="Stage prompts, same seed: end of coarse · end of mid · final",
                                       elem_id="lab-staged", **gallery_args)
        status = gr.Markdown(elem_id="lab-status")
        with gr.Group():
            focus = gr.Radio(FOCUS_CHOICES, value=settings["focus_stage"], elem_id="lab-focus",
                             label="Next training round: put RLR's half-order block in this stage")
            window = gr.Markdown(elem_id="lab-window")

    def window_text(stage: str, lo: float, hi: float, n_steps: float) -> str:
        if stage == "all":
            return "The HO block start *j* may fall anywhere in the chain."
        try:
            a, b = dcot.stage_window(stage, int(n_steps), (lo, hi))
        except dcot.StageError as err:
            return f"⚠️ {err}"
        return (f"With {int(n_steps)} steps, the block start *j* is drawn from the {stage} stage: "
                f"steps *k* = {a} .. {b} (the window [a, b] of the method doc; *k* = {int(n_steps)} is pure noise).")

    @user_errors
    def on_split(text: str):
        st = lab.split_prompt(text)
        how = ("Split with the built-in rules" if model.prompt_rules
               else "Each stage starts as the prompt itself: write what the layout, shape and detail stages get")
        return st["coarse"], st["mid"], st["fine"], f"{how}; edit any stage."

    @user_errors
    def on_preview(text, c, m, f, lo, hi, seed_value, n_steps):
        out = lab.preview_stages(text, c, m, f, lo, hi, seed_value, n_steps)
        names = ["end of coarse", "end of mid", "final"]
        scale = display_scale(model.image_size)
        # clips as looping animated PNGs (a gallery given PIL images would keep only a frame)
        show = ((lambda im: services.images.put(video.png_bytes(im, scale))) if clips
                else (lambda im: to_pil(im, scale=scale)))
        plain = [(show(im), f"plain · {name}") for im, name in zip(out["plain"], names)]
        staged = [(show(im), f"stages · {name}") for im, name in zip(out["staged"], names)]
        n = out["stage_steps"]
        table = (f"Steps per stage: coarse **{n[0]}**, mid **{n[1]}**, fine **{n[2]}** · "
                 f"plain prompt: *{out['prompt']}*")
        return plain, staged, table

    @user_errors
    def on_save(text, c, m, f, rater):  # the boundaries and focus are saved as they change (on_settings)
        saved = lab.save_stage_prompts(text, c, m, f, rater)
        return (f"Saved stage prompts for *{saved['prompt']}* ({len(saved['edit_ids'])} prompt edits). "
                "The next training round uses them.")

    @user_errors
    def on_settings(lo, hi, stage, n_steps, password):
        lab.set_stage_settings(lo, hi, stage, password)
        return window_text(stage, lo, hi, n_steps)

    split.click(on_split, prompt, [coarse, mid, fine, status], **QUICK, **PRIVATE)
    @user_errors
    def check_preview(*values):
        lab.check_preview(*values)

    preview_inputs = [prompt, coarse, mid, fine, mid_start, fine_start, seed, steps]
    preview.click(check_preview, preview_inputs, None, **QUICK, **PRIVATE).success(
        on_preview, preview_inputs, [plain_images, staged_images, schedule], **MODEL, **PRIVATE)
    save.click(on_save, [prompt, coarse, mid, fine, session.rater], status,
               **QUICK, **PRIVATE)
    for control in (focus, mid_start, fine_start):
        control.input(on_settings, [mid_start, fine_start, focus, steps, session.password], window,
                      **QUICK, **PRIVATE)
