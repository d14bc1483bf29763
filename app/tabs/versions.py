"""Model versions: every finished round adds one; see how people judged it, switch, roll back, export."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from app.errors import AppError, user_errors
from app.services import BASE_VERSION_NAME, AppServices
from app.tabs.common import PRIVATE, QUICK, Session

COLUMNS = ["active", "id", "name", "parent", "estimator", "samples", "ratings", "mean stars",
           "win rate vs parent", "wins-losses-ties", "prompt fidelity", "judged", "seed", "created"]
INTRO = ("Each finished training round makes a new version and makes it active. Its samples go to the "
         "rating queue, and blind before/after pairs (same prompt and seed, parent vs new) to the "
         "comparison queue: the **win rate vs parent** is what people judged. A version those pairs "
         "call worse than its parent with confidence (a one-sided sign test on the decisive answers, p < 0.05) "
         "is **⚠ flagged**, and so is one that lost **prompt fidelity** (judged on fixed probe prompts against "
         "its parent and the base model): such a version is not made active, but you can still make it active "
         "by hand. **★ best** marks the best-judged version, which auto-train builds on.")
# The base version is stored on first use (a fresh data folder stays empty, so an export can
# still be imported into it); until then the tab lists it under this key.
UNSTORED_BASE = "base"


def table(services: AppServices, versions: list[dict] | None = None) -> pd.DataFrame:
    versions = services.model_versions.table() if versions is None else versions
    if not versions:
        return pd.DataFrame([{**{c: "" for c in COLUMNS}, "active": "●", "name": BASE_VERSION_NAME, "samples": 0,
                              "ratings": 0}], columns=COLUMNS)
    rows = []
    for v in versions:
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
            "prompt fidelity": fidelity_label(v.get("metrics") or {}),
            "judged": judged_label(v), "seed": v.get("seed") if v.get("seed") is not None else "",
            "created": v["created_at"][:19].replace("T", " "),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def fidelity_label(metrics: dict) -> str:
    """The guard's numbers for a version a round made: its fidelity, the parent's, the base's."""
    if metrics.get("fidelity") is None:
        return ""
    return (f"{metrics['fidelity']:.3f} (parent {metrics['fidelity_parent']:.3f}, "
            f"base {metrics['fidelity_base']:.3f})")


def judged_label(v: dict) -> str:
    if v.get("fidelity_flagged"):
        return "⚠ flagged: lost prompt fidelity. " + (v.get("flag_reason") or "")
    if v.get("flagged"):
        return (f"⚠ flagged: worse than its parent (win rate ≤ {v['win_rate_upper']:.0%}, "
                f"p = {v['p_not_worse']:.3f})")
    return "★ best" if v.get("best_judged") else ""


def warning(versions: list[dict]) -> str:
    """What the page says when the active version is flagged, with the one-click way back."""
    active = next((v for v in versions if v["active"]), None)
    best = next((v for v in versions if v.get("best_judged")), None)
    if not active or not active.get("flagged"):
        return ""
    target = f"**{best['name']}**, the best-judged version" if best else "its parent"
    if active.get("fidelity_flagged"):
        return (f"⚠️ The active version **{active['name']}** lost prompt fidelity ({active.get('flag_reason')}). "
                f"**Roll back to the best-judged** makes {target} active again.")
    return (f"⚠️ The active version **{active['name']}** lost to its parent in the blind pairs "
            f"({active['wins_vs_parent']}-{active['losses_vs_parent']}-{active['ties_vs_parent']}). "
            f"**Roll back to the best-judged** makes {target} active again.")


def build(services: AppServices, session: Session, tab: gr.Tab, demo: gr.Blocks) -> None:
    with gr.Column(elem_id="versions-panel"):
        gr.Markdown(INTRO)
        # Filled when the page loads (demo.load below): what was true when the app started is stale.
        versions = gr.Dataframe(pd.DataFrame(columns=COLUMNS), interactive=False, elem_id="versions-table",
                                wrap=True)
        with gr.Row():
            pick = gr.Dropdown(choices=[], value=None, label="Version", elem_id="version-pick", scale=2)
            activate = gr.Button("Make active", elem_id="version-activate")
            rollback = gr.Button("Roll back to the parent", elem_id="version-rollback")
            to_best = gr.Button("Roll back to the best-judged", elem_id="version-rollback-best")
            export = gr.Button("Export LoRA weights", elem_id="version-export")
            refresh = gr.Button("Refresh", elem_id="version-refresh", size="sm")
        status = gr.Markdown(elem_id="version-status")
        download = gr.File(label="LoRA weights (.safetensors)", visible=False, elem_id="version-file")

    def refreshed(message: str = ""):
        table_, pick_, versions_ = refresh_outputs(services, with_versions=True)
        return table_, pick_, "  \n".join(m for m in (message, warning(versions_)) if m)

    def stored(version: int | str | None) -> int | str | None:
        """The version id; picking the base version before it is stored stores it (first use)."""
        return services.model_versions.ensure_base() if version == UNSTORED_BASE else version

    @user_errors
    def on_activate(version: int | str, password: str):
        services.admin.check(password)
        v = services.model_versions.set_active(stored(version), password)
        return refreshed(f"Active version: **{v['name']}**. New samples are drawn with it.")

    @user_errors
    def on_rollback(password: str):
        v = services.model_versions.rollback(password)
        return refreshed(f"Rolled back: **{v['name']}** is active again.")

    @user_errors
    def on_rollback_best(password: str):
        best = next((v for v in services.model_versions.table() if v.get("best_judged")), None)
        if best is None:
            raise AppError("no version is judged good enough to roll back to")
        v = services.model_versions.rollback(password, best["version_id"])
        return refreshed(f"Rolled back: **{v['name']}** (best-judged) is active.")

    @user_errors
    def on_export(version: int | str):
        path = services.model_versions.export_lora(stored(version))
        return gr.File(value=str(path), visible=True), f"Exported `{path.name}`."

    outs = [versions, pick, status]
    activate.click(on_activate, [pick, session.password], outs, **QUICK, **PRIVATE)
    rollback.click(on_rollback, session.password, outs, **QUICK, **PRIVATE)
    to_best.click(on_rollback_best, session.password, outs, **QUICK, **PRIVATE)
    export.click(on_export, pick, [download, status], **QUICK, **PRIVATE)
    refresh.click(refreshed, None, outs, **QUICK, **PRIVATE)
    tab.select(refreshed, None, outs, **QUICK, **PRIVATE)
    demo.load(refreshed, None, outs, **QUICK, **PRIVATE)


def version_choices(versions: list[dict]) -> list[tuple[str, int | str]]:
    if not versions:
        return [(BASE_VERSION_NAME, UNSTORED_BASE)]
    return [(f"{v['name']} (id {v['version_id']})", v["version_id"]) for v in versions]


def refresh_outputs(services: AppServices, with_versions: bool = False) -> tuple:
    """The table and the version picker (on the active version). Reads only: a page load stores nothing."""
    versions = services.model_versions.table()
    active = next((v["version_id"] for v in versions if v["active"]), UNSTORED_BASE if not versions else None)
    out = table(services, versions), gr.Dropdown(choices=version_choices(versions), value=active)
    return (*out, versions) if with_versions else out
