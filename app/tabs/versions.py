"""Model versions: every finished round adds one; see how people judged it, switch, roll back, export."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.errors import user_errors
from app.services import AppServices
from app.tabs.common import PRIVATE, QUICK, Session

COLUMNS = ["active", "id", "name", "parent", "estimator", "samples", "ratings", "mean stars",
           "win rate vs parent", "wins-losses-ties", "created"]
INTRO = ("Each finished training round makes a new version and makes it active. Its samples go to the "
         "rating queue, and blind before/after pairs (same prompt and seed, parent vs new) to the "
         "comparison queue: the **win rate vs parent** is what people judged.")


def table(services: AppServices) -> pd.DataFrame:
    rows = []
    for v in services.versions():
        rate = v["win_rate_vs_parent"]
        rows.append({
            "active": "●" if v["active"] else "", "id": v["version_id"], "name": v["name"],
            "parent": v["parent_id"] if v["parent_id"] is not None else "",
            "estimator": v.get("estimator") or "",
            "samples": v["n_samples"], "ratings": v["n_ratings"],
            "mean stars": round(v["mean_stars"], 2) if v["mean_stars"] is not None else "",
            "win rate vs parent": (f"{rate:.0%} of {v['comparisons_vs_parent']}" if rate is not None
                                   else "not judged yet" if v["parent_id"] is not None else ""),
            "wins-losses-ties": (f"{v['wins_vs_parent']}-{v['losses_vs_parent']}-{v['ties_vs_parent']}"
                                 if v["parent_id"] is not None else ""),
            "created": v["created_at"][:19].replace("T", " "),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def build(services: AppServices, session: Session, tab: gr.Tab) -> None:
    with gr.Column(elem_id="versions-panel"):
        gr.Markdown(INTRO)
        versions = gr.Dataframe(table(services), interactive=False, elem_id="versions-table", wrap=True)
        with gr.Row():
            pick = gr.Dropdown(choices=version_choices(services), value=services.state.get().active_version_id,
                               label="Version", elem_id="version-pick", scale=2)
            activate = gr.Button("Make active", elem_id="version-activate")
            rollback = gr.Button("Roll back to the parent", elem_id="version-rollback")
            export = gr.Button("Export LoRA weights", elem_id="version-export")
            refresh = gr.Button("Refresh", elem_id="version-refresh", size="sm")
        status = gr.Markdown(elem_id="version-status")
        download = gr.File(label="LoRA weights (.safetensors)", visible=False, elem_id="version-file")

    def refreshed(message: str = ""):
        return (*refresh_outputs(services), message)

    @user_errors
    def on_activate(version: int, password: str):
        v = services.set_active_version(version, password)
        return refreshed(f"Active version: **{v['name']}**. New samples are drawn with it.")

    @user_errors
    def on_rollback(password: str):
        v = services.rollback(password)
        return refreshed(f"Rolled back: **{v['name']}** is active again.")

    @user_errors
    def on_export(version: int):
        path = services.export_lora(version)
        return gr.File(value=str(path), visible=True), f"Exported `{path.name}`."

    outs = [versions, pick, status]
    activate.click(on_activate, [pick, session.password], outs, **QUICK, **PRIVATE)
    rollback.click(on_rollback, session.password, outs, **QUICK, **PRIVATE)
    export.click(on_export, pick, [download, status], **QUICK, **PRIVATE)
    refresh.click(refreshed, None, outs, **QUICK, **PRIVATE)
    tab.select(refreshed, None, outs, **QUICK, **PRIVATE)


def version_choices(services: AppServices) -> list[tuple[str, int]]:
    return [(f"{v['name']} (id {v['version_id']})", v["version_id"]) for v in services.versions()]


def refresh_outputs(services: AppServices) -> tuple[pd.DataFrame, gr.Dropdown]:
    return table(services), gr.Dropdown(choices=version_choices(services), value=services.active_version_id)
