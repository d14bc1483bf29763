"""The store's clips as a Hugging Face ``videofolder``: video files plus ``metadata.jsonl``.

``datasets``' VideoFolder reads .mkv, .mp4, .avi, .mpeg and .mov files. Each clip is written as
an uncompressed AVI (24-bit RGB frames, no codec: lossless, and writable without ffmpeg), named
by the sample's uid. ``metadata.jsonl`` has one row per clip (``file_name``, ``text``, the
model version, its stars and the sample's columns) and ``comparisons.jsonl`` the Pick-a-Pic
columns with ``video_0_file`` / ``video_1_file``. This is a one-way export for sharing; the
store's own export (:mod:`feedback_store.export`) is what imports back.

    load_dataset("videofolder", data_dir=out)
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from feedback_store import clips
from feedback_store.errors import StoreError
from feedback_store.export import COLUMNS, _rows
from feedback_store.images import sha256
from feedback_store.queries import OUTCOME_LABEL

if TYPE_CHECKING:
    from feedback_store.store import FeedbackStore

FPS = 1000 // clips.FRAME_MS


def _chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")


def _list(kind: bytes, data: bytes) -> bytes:
    return _chunk(b"LIST", kind + data)


def encode_avi(frames: np.ndarray, fps: int = FPS) -> bytes:
    """Uncompressed AVI of uint8 RGB frames (F, H, W, 3): BGR rows bottom-up, each padded to 4 bytes."""
    f, h, w, _ = frames.shape
    stride = (w * 3 + 3) // 4 * 4
    size = stride * h
    avih = struct.pack("<14I", 1_000_000 // fps, size * fps, 0, 0x10, f, 0, 1, size, w, h, 0, 0, 0, 0)
    strh = b"vids" + b"DIB " + struct.pack("<IHHIIIIIIiI4h", 0, 0, 0, 0, 1, fps, 0, f, size, -1, 0, 0, 0, w, h)
    strf = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, size, 0, 0, 0, 0)
    hdrl = _list(b"hdrl", _chunk(b"avih", avih) + _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf)))
    movi, index, offset = b"", b"", 4  # offsets count from the 'movi' fourcc
    for frame in frames:
        rows = np.zeros((h, stride), dtype=np.uint8)
        rows[:, : w * 3] = frame[::-1, :, ::-1].reshape(h, w * 3)  # bottom-up, BGR
        chunk = _chunk(b"00db", rows.tobytes())
        index += b"00db" + struct.pack("<III", 0x10, offset, size)
        movi += chunk
        offset += len(chunk)
    body = b"AVI " + hdrl + _list(b"movi", movi) + _chunk(b"idx1", index)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def read_avi(data: bytes) -> np.ndarray:
    """The frames of an AVI that :func:`encode_avi` wrote, (F, H, W, 3) RGB (a check, not a decoder)."""
    w, h = struct.unpack_from("<II", data, data.index(b"avih") + 8 + 32)
    stride = (w * 3 + 3) // 4 * 4
    frames, pos = [], data.index(b"movi") + 4
    while data[pos:pos + 4] == b"00db":
        (n,) = struct.unpack_from("<I", data, pos + 4)
        rows = np.frombuffer(data[pos + 8: pos + 8 + n], dtype=np.uint8).reshape(h, stride)[:, : w * 3]
        frames.append(rows.reshape(h, w, 3)[::-1, :, ::-1])
        pos += 8 + n + n % 2
    return np.stack(frames)


def export_videofolder(store: FeedbackStore, out_dir: Path) -> Path:
    """Write every clip of the store as a ``videofolder`` to ``out_dir`` (new or empty)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StoreError(f"export folder {out_dir} is not empty; choose a new folder")
    db = store.db
    db.conn.execute("BEGIN")  # one consistent snapshot
    try:
        tables = {t: _rows(db, t) for t in ("prompts", "model_versions", "samples", "ratings", "comparisons")}
    finally:
        db.rollback()
    prompts = {p["id"]: p["text"] for p in tables["prompts"]}
    versions = {m["id"]: m["name"] for m in tables["model_versions"]}
    stars: dict[int, list[int]] = {}
    for r in tables["ratings"]:
        stars.setdefault(r["sample_id"], []).append(r["stars"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        (tmp / "videos").mkdir()
        names: dict[int, str] = {}
        meta = []
        for s in tables["samples"]:
            if s["sampler_settings"].get("frames", 1) < 2:
                continue  # images are not videos
            path = store.images.path(f"images/{s['image_sha256'][:2]}/{s['image_sha256']}.png")
            data = path.read_bytes()
            if sha256(data) != s["image_sha256"]:
                raise StoreError(f"sample {s['id']}: its clip file is corrupt; export stopped")
            frames = clips.read_frames(data)
            names[s["id"]] = f"videos/{s['uid']}.avi"
            (tmp / names[s["id"]]).write_bytes(encode_avi(frames))
            got = stars.get(s["id"], [])
            meta.append({"file_name": names[s["id"]], "text": prompts[s["prompt_id"]],
                         "model_version": versions.get(s["model_version_id"]), "fps": FPS,
                         "frames": int(len(frames)), "n_ratings": len(got),
                         "mean_stars": sum(got) / len(got) if got else None,
                         **{k: s[k] for k in COLUMNS["samples"]}})
        comparisons = []
        for c in tables["comparisons"]:
            if c["left_id"] in names and c["right_id"] in names:
                label = OUTCOME_LABEL.get(c["outcome"])
                comparisons.append({"caption": meta_text(meta, names[c["left_id"]]),
                                    "video_0_file": names[c["left_id"]], "video_1_file": names[c["right_id"]],
                                    "label_0": label, "label_1": None if label is None else 1.0 - label,
                                    "has_label": label is not None, "user_id": c["rater_id"], **c})
        for name, rows in (("metadata.jsonl", meta), ("comparisons.jsonl", comparisons)):
            (tmp / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def meta_text(meta: list[dict], file_name: str) -> str:
    return next(m["text"] for m in meta if m["file_name"] == file_name)
