"""The public API: every action of the app as a named endpoint for ``gradio_client``.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    samples = client.predict("a red circle", 4, 0, 20, 3.0, api_name="/generate")
    client.predict(samples[0]["sample_id"], 5, "alice", api_name="/rate")

Images travel as base64 PNG (``image_png_b64``; a built-in 32x32 image is about 1 KB, a 512x512 one
about 400 KB); clips of a video model as base64 animated PNG in the same field (``frames`` > 1); exports and
LoRA weights as files. ``examples/api_loop.py`` drives a whole loop. Endpoints that change the
model or import or export data take ``admin_password``, which a local app ignores and a public one
checks. On a public app, ``rater`` is a rater token from ``/rater_token``, not a name (see
``app/identity.py`` and docs/security.md).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData
from gradio.utils import get_upload_folder

from app import files, video
from app.errors import user_errors
from app.identity import new_token
from app.round_config import RoundConfig
from app.services import AppServices
from app.tabs.common import MODEL_API, QUICK_API


def public_sample(sample: dict[str, Any]) -> dict[str, Any]:
    if "image" in sample:  # a preview: drawn, not stored
        media = sample["image"]
        return {**{k: v for k, v in sample.items() if k != "image"},
                "frames": media.shape[0] if media.dim() == 4 else 1,
                "image_png_b64": base64.b64encode(video.png_bytes(media)).decode()}
    out = {k: v for k, v in sample.items() if k != "image_file"}
    out["image_png_b64"] = base64.b64encode(files.read_image(sample["image_file"])).decode()
    return out


def jsonable(value: Any) -> Any:
    """JSON-safe copy: string keys (orjson refuses int keys, e.g. a star histogram), paths as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def register(services: AppServices) -> None:
    """Add the endpoints to the current ``gr.Blocks``."""
    s = services
    who = s.identity.api_rater  # public apps: a rater token in, its guest id out
    public = lambda value: s.scrub(jsonable(value))  # no absolute server paths in answers

    # ------------------------------------------------------------------ identity
    @user_errors
    def rater_token() -> dict:
        """A new rater token (keep it: it is who you are). On a public app, pass it wherever an
        endpoint asks for ``rater``; locally any name works and tokens are not needed."""
        token = new_token()
        return {"rater_token": token, "rater_id": s.identity.from_token(token)}

    def ping() -> dict:
        """Answers at once and does nothing: a health check, and the floor the queue itself puts
        under every action (bench/load.py times it)."""
        return {"ok": True}

    # ------------------------------------------------------------------ generate & rate
    @user_errors
    def generate(prompt: str, n: int = 4, seed: int = 0, steps: int = 20, guidance: float = 3.0,
                 version: int | None = None, preview: bool = False) -> list[dict]:
        """Draw n samples of a prompt with the active model version (or ``version``, an id from
        /versions); they join the rating queue. preview=true stores nothing: the images come back
        (sample_id null) and nothing the app learns from or judges changes."""
        return [public_sample(x) for x in s.generation.generate(prompt, n, seed, steps, guidance, version, preview)]

    @user_errors
    def samples_to_rate(rater: str, limit: int = 8) -> list[dict]:
        """Samples this rater has not rated yet, newest model version first."""
        return [public_sample(x) for x in s.judgements.to_rate(who(rater), limit)]

    @user_errors
    def rate(sample_id: int, stars: int, rater: str) -> dict:
        """Give a sample 1-5 stars (a second rating by the same rater replaces the first)."""
        return s.judgements.rate(sample_id, who(rater), stars)

    # ------------------------------------------------------------------ compare
    @user_errors
    def next_pair(rater: str) -> dict:
        """Two samples of one prompt to compare ({} when there is none); sides are random."""
        pair = s.judgements.next_pair(who(rater))
        if pair is None:
            return {}
        return {"prompt": pair["prompt"], "left": public_sample(pair["left"]), "right": public_sample(pair["right"])}

    @user_errors
    def compare(left_id: int, right_id: int, outcome: str, rater: str,
                response_time_s: float | None = None) -> dict:
        """Record a judgement: left, right, tie-both-good, tie-both-bad or skip."""
        return s.judgements.compare(left_id, right_id, outcome, who(rater), response_time_s)

    # ------------------------------------------------------------------ prompt lab
    @user_errors
    def split_prompt(prompt: str) -> dict:
        """The rule-based DCoT split: coarse, mid and fine stage prompts."""
        return s.prompt_lab.split_prompt(prompt)

    @user_errors
    def save_stage_prompts(prompt: str, coarse: str, mid: str, fine: str, rater: str) -> dict:
        """Save a prompt's stage prompts (as prompt edits); training rounds then use them."""
        out = s.prompt_lab.save_stage_prompts(prompt, coarse, mid, fine, who(rater))
        return {"prompt": out["prompt"], "stage_prompts": out["stage_prompts"], "edit_ids": out["edit_ids"]}

    @user_errors
    def set_stage_settings(mid_start: float, fine_start: float, focus_stage: str = "all",
                           admin_password: str = "") -> dict:
        """Stage boundaries (shares of the chain) and the stage the next round's HO block is drawn in
        (they change what rounds train: admins only on a public app)."""
        return s.prompt_lab.set_stage_settings(mid_start, fine_start, focus_stage, admin_password)

    @user_errors
    def preview_stages(prompt: str, coarse: str, mid: str, fine: str, mid_start: float = 0.3,
                       fine_start: float = 0.6, seed: int = 0, steps: int = 20) -> dict:
        """Plain prompt vs stage prompts from the same noise, at the end of each stage (base64 PNGs)."""
        out = s.prompt_lab.preview_stages(prompt, coarse, mid, fine, mid_start, fine_start, seed, steps)
        enc = lambda ims: [base64.b64encode(video.png_bytes(im)).decode() for im in ims]  # clips: animated PNGs
        return {"plain": enc(out["plain"]), "staged": enc(out["staged"]), "stage_steps": out["stage_steps"],
                "schedule": out["schedule"]}

    # ------------------------------------------------------------------ train
    @user_errors
    def train_start(settings: dict | None = None, admin_password: str = "") -> dict:
        """Start a training round. settings: estimator (rlr, ddpo, truncated-bp, full-bp), steps,
        batch_size, sampling_steps, learning_rate, lora_rank, block, rest, truncation, max_prompts,
        guidance, samples_per_prompt, sample_steps, sample_guidance, seed, uncertainty_penalty,
        patience, kl_coef, kl_reference (parent, base), fidelity_weight, anchor_kl, anchor_fidelity,
        fidelity_threshold, fidelity_check_every,
        fidelity_backoff, fidelity_probe_images, fidelity_probe_prompts, fidelity_rule (split, attributes),
        normalize_reward;
        anything left out takes its default (the model's), an unknown name is refused."""
        config = RoundConfig.parse(settings, s.round_defaults)
        job = s.rounds.start(config, admin_password)
        return {"job_id": job, "settings": config.public()}

    @user_errors
    def train_status() -> dict:
        """The current (or last) round: state, progress, seed, per-step reward, penalised reward and
        uncertainty, prompts."""
        return public(s.rounds.status())

    @user_errors
    def train_stop(admin_password: str = "") -> dict:
        """Ask the running round to stop after its current step."""
        return {"stopping": s.rounds.stop(admin_password)}

    @user_errors
    def set_auto_train(every: int, admin_password: str = "") -> dict:
        """Train automatically after every N new ratings and comparisons (0 switches it off)."""
        return {"auto_train_every": s.rounds.set_auto_train(every, admin_password)}

    # ------------------------------------------------------------------ versions
    @user_errors
    def versions() -> list[dict]:
        """Every model version with mean stars, the human-judged win rate over its parent, whether it
        is flagged (worse than its parent with confidence) or the best-judged, and its round's seed."""
        return public(s.model_versions.table())

    @user_errors
    def set_active_version(version_id: int, admin_password: str = "") -> dict:
        """Draw new samples with this version."""
        return public(s.model_versions.set_active(version_id, admin_password))

    @user_errors
    def rollback(admin_password: str = "", version_id: int | None = None) -> dict:
        """Make the active version's parent active again (or version_id, e.g. the best-judged one)."""
        return public(s.model_versions.rollback(admin_password, version_id))

    @user_errors
    def export_lora(version_id: int) -> FileData:
        """The version's folder as one .zip (<version name>-lora.zip): pytorch_lora_weights.safetensors
        (the LoRA, in diffusers' format), config.json (base model, the round's settings) and
        metrics.json; unzipped, diffusers' pipe.load_lora_weights(folder) loads it. The base model
        has none (an error). Open to everyone, also on a public app."""
        return FileData(path=str(s.model_versions.export_lora(version_id)))

    # ------------------------------------------------------------------ data
    @user_errors
    def counts() -> dict:
        """Rows per table: ratings, comparisons, samples, prompts, versions, rounds, ..."""
        return s.data.counts()

    @user_errors
    def rater_stats() -> list[dict]:
        """Per rater: ratings, mean stars, comparisons, tie and skip rates, median response time."""
        return public(s.data.rater_stats())

    @user_errors
    def export_data(admin_password: str = "") -> FileData:
        """Everything (database rows as JSON, images) as one .zip that import_data reads
        (on a public app: admins only, since it holds every rater's answers)."""
        return FileData(path=str(s.data.export_data(admin_password)))

    @user_errors
    def import_data(archive: FileData, admin_password: str = "") -> dict:
        """Import an export .zip into this app's (empty) data directory."""
        path = archive.get("path") if isinstance(archive, dict) else getattr(archive, "path", None)
        if not isinstance(path, str) or not path:
            raise gr.Error("choose an export (.zip) to import", print_exception=False)
        if not files.inside(Path(path), Path(get_upload_folder())):  # never a file already on the server
            raise gr.Error("upload the export .zip with the request (gradio_client: handle_file(path))",
                           print_exception=False)
        return s.data.import_data(Path(path), admin_password)

    slow = {generate, preview_stages}
    for fn in (ping, rater_token, generate, samples_to_rate, rate, next_pair, compare, split_prompt, save_stage_prompts,
               set_stage_settings, preview_stages, train_start, train_status, train_stop, set_auto_train,
               versions, set_active_version, rollback, export_lora, counts, rater_stats, export_data,
               import_data):
        gr.api(fn, api_name=fn.__name__, **(MODEL_API if fn in slow else QUICK_API))
