"""Content-addressed PNG files next to the database.

A sample's image lives at ``images/<h[:2]>/<h>.png`` where ``h`` is the SHA-256 of the PNG
bytes. Files are written to a temporary name, fsynced, then renamed into place: a crash leaves
either no file or the whole file, never a partial one under the final name. The store writes
the file before the row that points at it, so a row never points at a missing file (a crash in
between leaves only an unreferenced file, which is harmless).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from feedback_store.errors import FULL_MESSAGE, StoreFullError

IMAGE_DIR = "images"
FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def to_pil(image: Any) -> Image.Image:
    """Accept a PIL image, an (H, W, 3|4) or (H, W) array (uint8, or float in [0, 1]),
    or a (3, H, W) tensor-like with ``.detach()`` (torch), and return an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "detach"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.transpose(image, (1, 2, 0))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"image pixels must be uint8 or float in [0, 1], not {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or infinite values")
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def encode_png(image: Any) -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def relative_path(digest: str) -> str:
    return f"{IMAGE_DIR}/{digest[:2]}/{digest}.png"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            raise StoreFullError(FULL_MESSAGE) from err
        raise
    # Make the rename itself durable (POSIX: fsync the directory entry).
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ImageFiles:
    """The ``images/`` folder of a store: put bytes in, get a content hash and a path out."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, png: bytes) -> tuple[str, str]:
        """Store PNG bytes; return (sha256, path relative to the data dir). Idempotent."""
        digest = sha256(png)
        rel = relative_path(digest)
        target = self.root / rel
        if not (target.exists() and target.stat().st_size == len(png)):
            write_atomic(target, png)
        return digest, rel

    def path(self, rel: str) -> Path:
        return self.root / rel

    def check(self, rel: str, digest: str) -> str | None:
        """None if the file exists with the right content, else what is wrong with it."""
        p = self.path(rel)
        if not p.exists():
            return f"missing image file {rel}"
        if sha256(p.read_bytes()) != digest:
            return f"image file {rel} does not match its hash"
        return None
