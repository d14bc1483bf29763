"""Back up the data to a Hub dataset repo: an admin pushes an export .zip (``huggingface_hub``).

A Space without a Storage Bucket loses its data on restart; this is the way to keep it. The
token comes from the Space's secret ``HF_TOKEN`` (a write token of the account or organisation
that owns the dataset repo); the repo is created private if it does not exist, and each push
adds one file ``exports/rlr-feedback-<time>.zip`` that ``import_data`` reads back.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import AppError, user_errors
from app.services import AppServices
from app.tabs.common import PRIVATE, Session

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
HUB_API = {"concurrency_id": "hub", "concurrency_limit": 1}  # an upload must not hold up rating


def check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id.strip()) or ".." in repo_id:
        raise AppError("the dataset repo must look like owner/name (letters, digits, '-', '_', '.')")
    return repo_id.strip()


def _remove_export(archive: Path) -> None:
    """Delete the export and the temporary folder it was written to (never anything else)."""
    archive.unlink(missing_ok=True)
    parent = archive.parent
    if parent.parent == Path(tempfile.gettempdir()) and parent.name.startswith("rlr-export-"):
        shutil.rmtree(parent, ignore_errors=True)


def push_export(services: AppServices, repo_id: Any, password: Any = None, token: str | None = None) -> dict:
    """Export everything and upload it to the private dataset repo ``repo_id``; returns where."""
    services.admin.check(password)
    repo = check_repo_id(repo_id)
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise AppError("no Hub token: add a write token as the Space secret HF_TOKEN, then restart the Space")
    from huggingface_hub import HfApi

    archive = services.data.export_data(password)
    try:
        api = HfApi(token=token)
        path_in_repo = f"exports/{archive.name}"
        try:
            api.create_repo(repo, repo_type="dataset", private=True, exist_ok=True)
            info = api.upload_file(path_or_fileobj=str(archive), path_in_repo=path_in_repo, repo_id=repo,
                                   repo_type="dataset", commit_message=f"RLR feedback export {archive.name}")
        except Exception as err:  # network, auth and Hub errors all end here: say which, keep the app up
            raise AppError(f"could not push the export to the Hub dataset {repo}: "
                           f"{type(err).__name__}: {str(err)[:300]}") from err
        return {"repo_id": repo, "path_in_repo": path_in_repo, "bytes": archive.stat().st_size,
                "commit_url": str(getattr(info, "commit_url", info))}
    finally:
        _remove_export(archive)


def build(services: AppServices, session: Session) -> None:
    """The Data tab's backup panel (admins; the password box is the header's)."""
    with gr.Accordion("Back up to a Hub dataset", open=False, elem_id="hub-backup"):
        gr.Markdown("Pushes an export (.zip) to a **private** dataset repo with the Space's `HF_TOKEN` "
                    "secret. Import it later with the Import button.")
        with gr.Row():
            repo = gr.Textbox(label="Dataset repo (owner/name)", max_length=200, elem_id="hub-repo", scale=3)
            push = gr.Button("Push export", elem_id="hub-push", scale=1)
        status = gr.Markdown(elem_id="hub-status")

    @user_errors
    def on_push(repo_id: str, password: str) -> str:
        out = push_export(services, repo_id, password)
        return f"Pushed `{out['path_in_repo']}` ({out['bytes']} bytes) to `{out['repo_id']}`."

    push.click(on_push, [repo, session.password], status, **HUB_API, show_progress="minimal", **PRIVATE)


def register_api(services: AppServices) -> None:
    """The ``push_to_hub`` endpoint (admin)."""

    @user_errors
    def push_to_hub(repo_id: str, admin_password: str = "") -> dict:
        """Push an export .zip to a private Hub dataset repo (token: the HF_TOKEN secret)."""
        return push_export(services, repo_id, admin_password)

    gr.api(push_to_hub, api_name="push_to_hub", **HUB_API)
