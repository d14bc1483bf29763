"""The Data tab's video export: every clip as a Hugging Face ``videofolder`` (.zip), for sharing
the clips with their prompts, stars and comparisons (``feedback_store/videofolder.py``). Admins
only on a public app, like the full export; the full export is still what imports back."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from app.errors import AppError, user_errors
from app.services import AppServices
from app.tabs.common import PRIVATE, QUICK, QUICK_API, Session
from feedback_store.videofolder import export_videofolder


def export_videos(services: AppServices, password: Any = None) -> Path:
    """The clips as a videofolder .zip (videos/*.avi, metadata.jsonl, comparisons.jsonl)."""
    services.admin.check(password)
    if not services.model.is_video:
        raise AppError("this app serves an image model: its samples are images, not clips (use Export)")
    out = services.downloads.new_folder()
    folder = export_videofolder(services.store, out / "videofolder")
    archive = shutil.make_archive(str(out / "rlr-clips-videofolder"), "zip", root_dir=folder)
    shutil.rmtree(folder)
    return Path(archive)


def build(services: AppServices, session: Session) -> None:
    with gr.Accordion("Export the clips as a video dataset", open=False, elem_id="video-export"):
        gr.Markdown("A Hugging Face `videofolder` (.zip): every clip as a lossless AVI with its prompt, "
                    "stars and comparisons in `metadata.jsonl` and `comparisons.jsonl`; "
                    "`load_dataset(\"videofolder\", data_dir=...)` reads it.")
        go = gr.Button("Export clips (videofolder .zip)", elem_id="video-export-go")
        file = gr.File(label="Video dataset", interactive=False, visible=False, elem_id="video-export-file")

    @user_errors
    def on_export(password: str):
        return gr.File(value=str(export_videos(services, password)), visible=True)

    go.click(on_export, session.password, file, **QUICK, **PRIVATE)


def register_api(services: AppServices) -> None:
    @user_errors
    def export_videos_api(admin_password: str = "") -> FileData:
        """Every clip as a Hugging Face videofolder .zip (a video app; admins only on a public app)."""
        return FileData(path=str(export_videos(services, admin_password)))

    gr.api(export_videos_api, api_name="export_videos", **QUICK_API)
