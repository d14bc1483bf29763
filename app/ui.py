"""The Gradio UI. Each tab is built by one function; handlers stay thin and call services."""

from __future__ import annotations

import gradio as gr
import torch

from rlr_core import shapes_world as sw
from rlr_core import text
from rlr_core.backend import BuiltinBackend
from rlr_core.sampling import generate

CSS = "#gallery img, .pixelated img { image-rendering: pixelated; }"
EXAMPLES = [
    "a large red circle on the left, black background",
    "a small blue square in the center, white background",
    "a yellow triangle, navy background",
    "a large green triangle on the right",
]


def generate_images(backend: BuiltinBackend, prompt: str, n: int, seed: int, steps: int, guidance: float):
    """Validate the prompt, then draw ``n`` images; errors become messages for the user."""
    try:
        canonical = backend.check_prompt(prompt)
    except text.PromptError as err:
        raise gr.Error(str(err)) from None
    n, steps = int(n), int(steps)
    if not 1 <= n <= 16:
        raise gr.Error("number of images must be between 1 and 16")
    if not 1 <= steps <= 100:
        raise gr.Error("steps must be between 1 and 100")
    with torch.no_grad():
        images = generate(backend.model, [canonical] * n, steps=steps, guidance=float(guidance), seed=int(seed))
    return [(sw.to_pil(im.permute(1, 2, 0).numpy(), scale=4), f"seed {int(seed)} #{i}")
            for i, im in enumerate(images)], f"prompt: {canonical}"


def build_ui(backend: BuiltinBackend) -> gr.Blocks:
    with gr.Blocks(title="RLR feedback") as demo:
        gr.Markdown("# RLR feedback\nGenerate images from the built-in ShapesWorld model.")
        with gr.Tab("Generate"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], elem_id="prompt", scale=4)
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                n = gr.Slider(1, 16, value=8, step=1, label="Images")
                seed = gr.Number(value=0, precision=0, label="Seed")
                steps = gr.Slider(1, 100, value=20, step=1, label="DDIM steps")
                guidance = gr.Slider(1.0, 8.0, value=3.0, step=0.5, label="Guidance")
            gr.Examples(EXAMPLES, inputs=prompt)
            status = gr.Markdown()
            gallery = gr.Gallery(label="Samples", columns=8, format="png", elem_id="gallery", height="auto")
        go.click(lambda *a: generate_images(backend, *a), [prompt, n, seed, steps, guidance],
                 [gallery, status], api_name="generate")
        prompt.submit(lambda *a: generate_images(backend, *a), [prompt, n, seed, steps, guidance],
                      [gallery, status], api_visibility="private")
    return demo
