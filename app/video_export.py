"""The Data tab's video export: every clip as a Hugging Face ``videofolder`` (.zip), for sharing
the clips with their prompts, stars and comparisons (``feedback_store/videofolder.py``). Admins
only on a public app, like the full export; the full export is still what imports back. The
export itself is ``Data.export_videos`` (app/services/data.py); this module is its button and endpoint."""

from __future__ import annotations

import gradio as gr
from gradio.data_classes import FileData

from app.errors import user_errors
from app.services import AppServices
from app.tabs.common import PRIVATE, QUICK, QUICK_API, Session


def build(services: AppServices, session: Session) -> None:
    with gr.Accordion("Export the clips as a video dataset", open=False, elem_id="video-export"):
        gr.Markdown("A Hugging Face `videofolder` (.zip): every clip as a lossless AVI with its prompt, "
                    "stars and comparisons in `metadata.jsonl` and `comparisons.jsonl`; "
                    "`load_dataset(\"videofolder\", data_dir=...)` reads it.")
        go = gr.Button("Export clips (videofolder .zip)", elem_id="video-export-go")
        file = gr.File(label="Video dataset", interactive=False, visible=False, elem_id="video-export-file")

    @user_errors
    def on_export(password: str):
        return gr.File(value=str(services.data.export_videos(password)), visible=True)

    go.click(on_export, session.password, file, **QUICK, **PRIVATE)


def register_api(services: AppServices) -> None:
    @user_errors
    def export_videos_api(admin_password: str = "") -> FileData:
        """Every clip as a Hugging Face videofolder .zip (a video app; admins only on a public app)."""
        return FileData(path=str(services.data.export_videos(admin_password)))

    gr.api(export_videos_api, api_name="export_videos", **QUICK_API)
