"""Export a store to a folder, and import such a folder into a fresh store.

The folder is a Hugging Face ``imagefolder`` (``images/*.png`` + ``metadata.jsonl``, one row per
sample) whose ``comparisons.jsonl`` follows the Pick-a-Pic columns (caption, image_0_uid/file,
image_1_uid/file, label_0/label_1 with ties as 0.5/0.5, best_image_uid, user_id). The other
tables go to ``<table>.jsonl`` and ``manifest.json`` records format, schema version, counts and
a SHA-256 per file. Together they hold every row, so export -> import round-trips exactly.

Import validates everything first (JSON, columns, types, references, image hashes) and then
inserts all rows in one transaction: a malformed folder raises ``ImportFormatError`` and
leaves the store untouched.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sqlite_utils import Database

from feedback_store import db as dbmod
from feedback_store import validation as val
from feedback_store.errors import ImportFormatError, StateError, StoreError
from feedback_store.images import relative_path, sha256
from feedback_store.queries import OUTCOME_LABEL
from feedback_store.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from feedback_store.store import FeedbackStore

FORMAT = "rlr-feedback-export"
FORMAT_VERSION = 1
OPT = type(None)
# Column -> accepted JSON types, per table (in insertion order: referenced tables first).
COLUMNS: dict[str, dict[str, tuple[type, ...]]] = {
    "raters": {"id": (str,), "kind": (str,), "name": (str, OPT), "created_at": (str,)},
    "prompts": {"id": (int,), "text": (str,), "created_at": (str,)},
    "model_versions": {"id": (int,), "name": (str,), "parent_id": (int, OPT), "weights_path": (str, OPT),
                       "config": (dict,), "metrics": (dict,), "created_at": (str,)},
    "samples": {"id": (int,), "uid": (str,), "prompt_id": (int,), "model_version_id": (int, OPT),
                "image_sha256": (str,), "width": (int,), "height": (int,), "seed": (int, OPT),
                "sampler_settings": (dict,), "stage_prompts": (list, OPT), "created_at": (str,)},
    "ratings": {"id": (int,), "sample_id": (int,), "rater_id": (str,), "stars": (int,),
                "submission_id": (str, OPT), "created_at": (str,), "updated_at": (str,)},
    "comparisons": {"id": (int,), "left_id": (int,), "right_id": (int,), "outcome": (str,),
                    "rater_id": (str,), "response_time_s": (float, int, OPT), "submission_id": (str, OPT),
                    "created_at": (str,), "updated_at": (str,)},
    "prompt_edits": {"id": (int,), "original": (str,), "edited": (str,), "stage": (int, OPT),
                     "reason": (str, OPT), "rater_id": (str, OPT), "sample_id": (int, OPT),
                     "created_at": (str,)},
    "training_rounds": {"id": (int,), "base_version_id": (int, OPT), "output_version_id": (int, OPT),
                        "state": (str,), "progress": (float, int), "config": (dict,), "metrics": (dict,),
                        "error": (str, OPT), "started_at": (str,), "updated_at": (str,),
                        "finished_at": (str, OPT)},
}
FILES = {"samples": "metadata.jsonl", **{t: f"{t}.jsonl" for t in COLUMNS if t != "samples"}}
JSON_TEXT = {"config", "metrics", "sampler_settings", "stage_prompts"}  # stored as JSON text in SQLite
# (table, column) -> referenced table
REFERENCES = {("model_versions", "parent_id"): "model_versions", ("samples", "prompt_id"): "prompts",
              ("samples", "model_version_id"): "model_versions", ("ratings", "sample_id"): "samples",
              ("ratings", "rater_id"): "raters", ("comparisons", "left_id"): "samples",
              ("comparisons", "right_id"): "samples", ("comparisons", "rater_id"): "raters",
              ("prompt_edits", "rater_id"): "raters", ("prompt_edits", "sample_id"): "samples",
              ("training_rounds", "base_version_id"): "model_versions",
              ("training_rounds", "output_version_id"): "model_versions"}


def _file_name(digest: str) -> str:
    return f"images/{digest}.png"


# ------------------------------------------------------------------------------- export
def _rows(db: Database, table: str) -> list[dict[str, Any]]:
    rows = []
    for row in db[table].rows_where(order_by="id"):
        row = {k: row[k] for k in COLUMNS[table]}
        for key in JSON_TEXT & row.keys():
            if isinstance(row[key], str):
                row[key] = json.loads(row[key])
        rows.append(row)
    return rows


def _pick_a_pic(cmp: dict, samples: dict[int, dict], prompts: dict[int, str], versions: dict[int, str]) -> dict:
    left, right = samples[cmp["left_id"]], samples[cmp["right_id"]]
    label = OUTCOME_LABEL.get(cmp["outcome"])  # None for skip
    best = "" if label in (None, 0.5) else (left["uid"] if label == 1.0 else right["uid"])
    return {"caption": prompts[left["prompt_id"]],
            "image_0_uid": left["uid"], "image_0_file": _file_name(left["image_sha256"]),
            "image_1_uid": right["uid"], "image_1_file": _file_name(right["image_sha256"]),
            "label_0": label, "label_1": None if label is None else 1.0 - label,
            "best_image_uid": best, "has_label": label is not None, "user_id": cmp["rater_id"],
            "model_0": versions.get(left["model_version_id"]), "model_1": versions.get(right["model_version_id"]),
            **cmp}


def export_folder(store: FeedbackStore, out_dir: Path) -> Path:
    """Write the whole store to ``out_dir`` (which must not exist or be empty)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StoreError(f"export folder {out_dir} is not empty; choose a new folder")
    # One read transaction, so the export is a consistent snapshot even while others write.
    db = store.db
    db.conn.execute("BEGIN")
    try:
        tables = {t: _rows(db, t) for t in COLUMNS}
    finally:
        db.rollback()
    for m in tables["model_versions"]:  # older rows hold absolute paths: export them relative
        m["weights_path"] = _relative_weights(m["weights_path"], store.data_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        (tmp / "images").mkdir()
        prompts = {p["id"]: p["text"] for p in tables["prompts"]}
        versions = {m["id"]: m["name"] for m in tables["model_versions"]}
        samples = {s["id"]: s for s in tables["samples"]}
        stars: dict[int, list[int]] = {}
        for r in tables["ratings"]:
            stars.setdefault(r["sample_id"], []).append(r["stars"])
        for s in tables["samples"]:
            data = store.images.path(relative_path(s["image_sha256"])).read_bytes()
            if sha256(data) != s["image_sha256"]:
                raise StoreError(f"sample {s['id']}: its image file is corrupt; export stopped")
            (tmp / _file_name(s["image_sha256"])).write_bytes(data)
        rows_by_file = {
            "metadata.jsonl": [{"file_name": _file_name(s["image_sha256"]), "text": prompts[s["prompt_id"]],
                                "model_version": versions.get(s["model_version_id"]),
                                "n_ratings": len(stars.get(s["id"], [])),
                                "mean_stars": (sum(stars[s["id"]]) / len(stars[s["id"]]))
                                if s["id"] in stars else None, **s} for s in tables["samples"]],
            "comparisons.jsonl": [_pick_a_pic(c, samples, prompts, versions) for c in tables["comparisons"]],
            **{FILES[t]: tables[t] for t in COLUMNS if t not in ("samples", "comparisons")},
        }
        digests = {}
        for name, rows in rows_by_file.items():
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            (tmp / name).write_text(text, encoding="utf-8")
            digests[name] = sha256(text.encode("utf-8"))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "schema_version": SCHEMA_VERSION,
                    "exported_at": val.now(), "counts": {t: len(r) for t, r in tables.items()},
                    "files": digests}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------- import
def _fail(msg: str) -> ImportFormatError:
    return ImportFormatError(f"cannot import: {msg}. Nothing was imported.")


def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise _fail(f"{folder} is not a folder")
    path = folder / "manifest.json"
    if not path.is_file():
        raise _fail(f"{folder} has no manifest.json (is it a folder made by export_folder?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _fail(f"manifest.json is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(f"manifest.json does not describe a {FORMAT!r} folder")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(f"export format version {manifest.get('format_version')!r} is not supported "
                    f"(this app reads version {FORMAT_VERSION})")
    if not isinstance(manifest.get("schema_version"), int) or manifest["schema_version"] > SCHEMA_VERSION:
        raise _fail("the folder was exported by a newer version of the app")
    if not isinstance(manifest.get("files"), dict):
        raise _fail("manifest.json lists no files")
    return manifest


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _read_table(folder: Path, table: str, manifest: dict) -> list[dict[str, Any]]:
    name = FILES[table]
    path = folder / name
    if not path.is_file():
        raise _fail(f"{name} is missing")
    data = path.read_bytes()
    if manifest["files"].get(name) != sha256(data):
        raise _fail(f"{name} does not match the checksum in manifest.json (edited or truncated?)")
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            raw = json.loads(line)
        except ValueError as err:
            raise _fail(f"{name} line {n} is not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise _fail(f"{name} line {n} is not a JSON object")
        row = {}
        for col, types in COLUMNS[table].items():
            if col not in raw:
                raise _fail(f"{name} line {n} has no {col!r}")
            if not _type_ok(raw[col], types):
                raise _fail(f"{name} line {n}: {col!r} has the wrong type ({type(raw[col]).__name__})")
            row[col] = raw[col]
        rows.append(row)
    return rows


def _relative_weights(path: str | None, data_dir: Path) -> str | None:
    if not path or not Path(path).is_absolute():
        return path
    try:
        return Path(path).resolve().relative_to(Path(data_dir).resolve()).as_posix()
    except ValueError:
        return None  # outside the data folder: not something another app could use


def check_weights_path(path: str | None) -> None:
    """A version's weights folder: a relative path inside the data folder (the app loads
    weights only from its ``versions/`` folder; see app/models.py)."""
    if path is None:
        return
    parts = PurePosixPath(path).parts
    if (not parts or "\\" in path or ":" in path or path.startswith("/") or ".." in parts
            or any(ord(c) < 32 for c in path)):
        raise _fail(f"model_versions.jsonl: weights_path {path!r} is not a relative path inside the "
                    "data folder")


def _check_values(tables: dict[str, list[dict[str, Any]]]) -> None:
    for m in tables["model_versions"]:
        check_weights_path(m["weights_path"])
    ids: dict[str, set] = {}
    for table, rows in tables.items():
        ids[table] = {r["id"] for r in rows}
        if len(ids[table]) != len(rows):
            raise _fail(f"{FILES[table]} repeats an id")
    for (table, col), target in REFERENCES.items():
        for r in tables[table]:
            if r[col] is not None and r[col] not in ids[target]:
                raise _fail(f"{FILES[table]}: row {r['id']} refers to {target} {r[col]!r}, which is not there")
    try:
        for r in tables["ratings"]:
            val.stars(r["stars"])
        for r in tables["comparisons"]:
            val.outcome(r["outcome"])
            val.response_time(r["response_time_s"])
        for r in tables["training_rounds"]:
            val.progress(r["progress"])
    except StoreError as err:
        raise _fail(str(err)) from err


def _check_images(folder: Path, samples: list[dict[str, Any]]) -> dict[str, Path]:
    """Each sample's image file, checked against its hash (read one at a time: an import's
    memory does not grow with its images)."""
    images = {}
    for s in samples:
        digest = s["image_sha256"]
        if digest in images:
            continue
        path = folder / _file_name(digest)
        if not path.is_file():
            raise _fail(f"sample {s['id']}: image file {_file_name(digest)} is missing")
        if sha256(path.read_bytes()) != digest:
            raise _fail(f"sample {s['id']}: image file {_file_name(digest)} does not match its hash")
        images[digest] = path
    return images


def _db_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
    out = {k: (json.dumps(v, sort_keys=True) if k in JSON_TEXT and v is not None else v) for k, v in row.items()}
    if table == "samples":
        out["image_path"] = relative_path(row["image_sha256"])
    return out


def import_folder(store: FeedbackStore, folder: Path) -> dict[str, int]:
    """Import an exported folder into an empty store; return the number of rows per table."""
    manifest = _read_manifest(folder)
    tables = {t: _read_table(folder, t, manifest) for t in COLUMNS}
    _check_values(tables)
    images = _check_images(folder, tables["samples"])
    if any(store.counts().values()):
        raise StateError("import_folder needs a fresh, empty store; nothing was imported")
    created = [d for d in images if not store.images.path(relative_path(d)).exists()]
    for digest in created:
        store.images.put(images[digest].read_bytes())

    def tx(db: Database) -> None:
        if any(db[t].count for t in COLUMNS):  # re-check under the write lock
            raise StateError("import_folder needs a fresh, empty store; nothing was imported")
        db.execute("PRAGMA defer_foreign_keys = ON")  # model versions may refer to later rows
        for table, rows in tables.items():
            db[table].insert_all([_db_row(table, r) for r in rows])

    try:
        dbmod.write(store.db, tx)
    except BaseException as err:
        for digest in created:  # leave the data directory as it was
            store.images.path(relative_path(digest)).unlink(missing_ok=True)
        if isinstance(err, sqlite3.IntegrityError):
            raise _fail(f"the database refused a row ({err})") from err
        raise
    return {t: len(rows) for t, rows in tables.items()}
