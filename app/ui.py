"""The Gradio app: a header (who is rating), one tab per part of the loop, and the API.

``create_app(config)`` builds everything; ``launch_kwargs(services)`` holds what Gradio 6
wants at ``launch()`` time (CSS, the keyboard script, and the data folder as a blocked path:
the UI shows copies of sample images made elsewhere, see ``app/files.py``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import gradio as gr

from app import api, gradio_sessions, hub_export, video_export
from app.archive import MAX_BYTES
from app.config import AppConfig
from app.queue_settings import configure_queue
from app.round_config import ESTIMATOR_CHOICES
from app.services import AppServices
from app.storage import storage_warning
from app.tabs import compare, data, prompt_lab, rate, train, versions
from app.tabs.common import PRIVATE, QUICK, Session
from rlr_core.backends.base import DiffusionBackend
from rlr_core.images import is_pixel_art

STATIC = Path(__file__).parent / "static"
# Small images (the built-in 32x32) are enlarged without smoothing; large ones render normally.
PIXEL_ART_CSS = ".pixelated img, #gallery img, #lab-plain img, #lab-staged img { image-rendering: pixelated; }\n"
CSS = """
#current img, #cmp-left-img img, #cmp-right-img img { object-fit: contain; }
.rlr-progress { width: 100%; height: 14px; background: #e4e7ee; border-radius: 7px; overflow: hidden; }
.rlr-bar { height: 100%; transition: width 0.4s; }
.rlr-progress-text { margin-top: 4px; font-size: 0.95em; }
#star-row button { font-size: 1.05em; }
"""
TITLE = "RLR feedback"


def header_text(services: AppServices) -> str:
    public = " · public: model changes need the admin password" if services.config.needs_admin else ""
    things = services.model.noun(plural=True)
    return (f"# {TITLE}\nRate the model's {things}; the app learns what you like and fine-tunes the model "
            f"in the background with the gradient estimator the Train tab picks (RLR by design, the default "
            f"where the loop benchmark chose it). Model: **{services.model.device_summary()}**{public}")


def create_app(config: AppConfig, backend: DiffusionBackend | None = None) -> tuple[gr.Blocks, AppServices]:
    gradio_sessions.install()  # an API call must not build the whole page's config (bench/load.py)
    services = AppServices(config, backend)
    # Gradio's cache holds the copies it serves (images, exports): drop those older than a day.
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(header_text(services))
        if (warning := storage_warning(services.data_dir)) is not None:
            gr.Markdown(warning, elem_id="storage-warning")
        with gr.Row():
            if services.identity.public:
                rater, on_load_public = identity_header(services)
            else:
                rater = gr.Textbox(label="Your name (rater id)", elem_id="rater", max_length=64, scale=2,
                                   info="Ratings are stored under this name; each browser gets a guest name.")
            password = gr.Textbox(label="Admin password", type="password", elem_id="admin-password", scale=1,
                                  visible=config.needs_admin)
            active = gr.Markdown(elem_id="active-version")
        session = Session(rater=rater, password=password)

        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Generate & rate", id="rate", elem_id="tab-rate"):
                rate.build(services, session)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_tab:
                compare.build(services, session, compare_tab)
            with gr.Tab("Prompt lab", id="lab", elem_id="tab-lab"):
                prompt_lab.build(services, session)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train.build(services, session)
            with gr.Tab("Model versions", id="versions", elem_id="tab-versions") as versions_tab:
                versions.build(services, session, versions_tab, demo)
            with gr.Tab("Data", id="data", elem_id="tab-data") as data_tab:
                data.build(services, session, data_tab)
                hub_export.build(services, session)
                if services.model.is_video:
                    video_export.build(services, session)

        if services.identity.public:
            on_load_public(demo, password, active)
        else:
            saved_name = gr.BrowserState("", storage_key="rlr-rater")

            def on_load(saved: str) -> tuple[str, str, str]:
                name = saved or f"guest-{secrets.token_hex(2)}"
                return name, name, active_text(services)

            def remember(name: str) -> str:
                return (name or "").strip()

            demo.load(on_load, saved_name, [rater, saved_name, active], **QUICK, **PRIVATE)
            rater.change(remember, rater, saved_name, **QUICK, **PRIVATE)
        gr.Timer(2.0).tick(lambda: active_text(services), None, active,
                           **QUICK, **PRIVATE)
        api.register(services)
        hub_export.register_api(services)
        video_export.register_api(services)
    configure_queue(demo, config.queue_size)
    return demo, services


def identity_header(services: AppServices):
    """A public app's rater: a server-side state set at page load (HF username or guest id), shown
    but never typed; returns it and a function that wires the page load."""
    identity, admin = services.identity, services.admin
    rater = gr.State("")  # kept on the server per browser session: a client cannot set it
    with gr.Column(scale=2):
        shown = gr.Markdown("Rating as a guest", elem_id="rater")
        if identity.sign_in:
            gr.LoginButton(elem_id="login")
    token = gr.BrowserState("", storage_key="rlr-rater-token", secret=identity.browser_secret)

    def load_identity(saved: str, profile: gr.OAuthProfile | None) -> tuple:
        username = profile.username if profile is not None else None
        rater_id, kept = identity.browser_rater(saved, username)
        if username:
            text = f"Rating as **{username}** (signed in with Hugging Face)"
        else:
            text = ("Rating as a guest: your ratings are kept under an anonymous id stored in this browser"
                    + (" · sign in with Hugging Face to rate under your name" if identity.sign_in else ""))
        key = admin.issue_key(username) if admin.is_admin_user(username) else gr.skip()
        return rater_id, kept, text, key, active_text(services)

    def wire_load(demo: gr.Blocks, password: gr.Textbox, active: gr.Markdown) -> None:
        # A signed-in admin's page gets an admin key in the password box (app/admin_guard.py).
        demo.load(load_identity, token, [rater, token, shown, password, active], **QUICK, **PRIVATE)

    return rater, wire_load


def active_text(services: AppServices) -> str:
    versions_ = services.model_versions.table()
    active = next((v for v in versions_ if v["active"]), None)
    name = active["name"] if active else "v0 (base)"
    status = services.rounds.status()
    running = status["state"] in ("running", "stopping")
    training = f" · training with **{estimator_label(status.get('estimator'))}**: {int(status['progress'] * 100)}%" \
        if running else f" · next round: **{estimator_label(services.rounds.next_estimator())}**"
    return f"Active model version: **{name}**{training}"


def estimator_label(name: str | None) -> str:
    return next((label for label, value in ESTIMATOR_CHOICES if value == name), name or "?")


def launch_kwargs(services: AppServices) -> dict[str, Any]:
    keys = (STATIC / "keys.js").read_text()
    css = (PIXEL_ART_CSS if is_pixel_art(services.model.image_size) else "") + CSS
    # No allowed_paths: nothing in the data folder is served, and blocking it also keeps anyone
    # from making Gradio open feedback.db (which would drop SQLite's locks in this process).
    return {"css": css, "head": f"<script>{keys}</script>", "theme": gr.themes.Soft(),
            "blocked_paths": sorted({str(services.data_dir.absolute()), str(services.data_dir.resolve())}),
            "max_file_size": MAX_BYTES,
            "footer_links": ["api", "gradio"]}
