"""Data: what has been collected, who rated how, and export/import of the whole store."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.errors import user_errors
from app.services import AppServices
from app.tabs.common import PRIVATE, QUICK, Session, fmt

RATER_COLUMNS = ["rater_id", "kind", "n_ratings", "mean_stars", "n_comparisons", "tie_rate", "skip_rate",
                 "median_response_time_s"]
AGREEMENT_COLUMNS = ["rater_a", "rater_b", "n_common_ratings", "stars_mean_abs_diff", "n_common_pairs",
                     "pair_agreement"]


def counts_table(services: AppServices) -> pd.DataFrame:
    return pd.DataFrame([{"what": k.replace("_", " "), "count": v} for k, v in services.data.counts().items()])


def rater_table(services: AppServices) -> pd.DataFrame:
    rows = [{c: fmt(r.get(c)) for c in RATER_COLUMNS} for r in services.data.rater_stats()]
    return pd.DataFrame(rows, columns=RATER_COLUMNS)


def agreement_table(services: AppServices) -> pd.DataFrame:
    rows = [{c: fmt(r.get(c)) for c in AGREEMENT_COLUMNS} for r in services.data.rater_agreement()]
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def build(services: AppServices, session: Session, tab: gr.Tab) -> None:
    with gr.Column(elem_id="data-panel"):
        refresh = gr.Button("Refresh", size="sm", elem_id="data-refresh")
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                counts = gr.Dataframe(counts_table(services), label="Counts", interactive=False,
                                      elem_id="data-counts")
            with gr.Column(scale=3):
                raters = gr.Dataframe(rater_table(services), label="Per rater", interactive=False,
                                      elem_id="data-raters", wrap=True)
        agreement = gr.Dataframe(agreement_table(services), label="Agreement between raters (same samples / "
                                 "same pairs)", interactive=False, elem_id="data-agreement")
        gr.Markdown("**Export** writes every rating, comparison, prompt, prompt edit, version and image to "
                    "one .zip. **Import** reads such a .zip into an app started on an empty data directory.")
        with gr.Row(equal_height=False):
            with gr.Column():
                export = gr.Button("Export everything (.zip)", elem_id="data-export")
                exported = gr.File(label="Export", interactive=False, elem_id="data-export-file", visible=False)
            with gr.Column():
                upload = gr.File(label="An export (.zip) to import", file_types=[".zip"], height=120,
                                 elem_id="data-import-file")
                do_import = gr.Button("Import", elem_id="data-import")
        status = gr.Markdown(elem_id="data-status")

    def tables():
        return counts_table(services), rater_table(services), agreement_table(services)

    @user_errors
    def on_export(password: str):
        path = services.data.export_data(password)
        return (gr.File(value=str(path), visible=True),
                f"Exported to `{path.name}`: ratings, comparisons, prompts, images, versions.")

    @user_errors
    def on_import(file, password):
        added = services.data.import_data(file, password)
        summary = ", ".join(f"{v} {k}" for k, v in added.items() if v) or "nothing new"
        return (*tables(), f"Imported: {summary}.")

    refresh.click(tables, None, [counts, raters, agreement], **QUICK, **PRIVATE)
    tab.select(tables, None, [counts, raters, agreement], **QUICK, **PRIVATE)
    export.click(on_export, session.password, [exported, status], **QUICK, **PRIVATE)
    do_import.click(on_import, [upload, session.password], [counts, raters, agreement, status], **QUICK, **PRIVATE)
