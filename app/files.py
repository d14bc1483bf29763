"""Which files the web server may hand out, and the app's temporary files.

Nothing under the data folder is ever given to Gradio: Gradio serves (and, for a moment,
opens) every file it is given, and a second open of ``feedback.db`` in this process would drop
SQLite's POSIX locks (closing any descriptor of a file releases all of the process's locks
on it). So the UI shows copies of sample images, named by their content hash, made in a
folder of their own; exports and LoRA zips are written to a temporary folder the app empties.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from app.errors import AppError
from feedback_store.images import sha256

DIGEST_NAME = re.compile(r"^[0-9a-f]{64}\.png$")


def read_image(image_file: str | Path) -> bytes:
    """A store image's PNG bytes, checked against the hash it is named by."""
    source = Path(image_file)
    if not DIGEST_NAME.match(source.name):  # only the store's content-addressed images
        raise AppError("this file is not a sample image")
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise AppError(f"the image file of this sample ({source.stem[:12]}…) is missing") from None
    if sha256(data) != source.stem:
        raise AppError(f"the image file of this sample ({source.stem[:12]}…) is damaged "
                       "(it does not match its hash); it cannot be shown")
    return data


class PublicImages:
    """Copies of sample images the UI may show, outside the data folder, by content hash."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="rlr-images-"))
        self.root.mkdir(parents=True, exist_ok=True)

    def copy(self, image_file: str | Path) -> str:
        """The public copy of a store image (``images/<h[:2]>/<h>.png``), checked against its hash."""
        source = Path(image_file)
        target = self.root / source.name
        if target.is_file():
            return str(target)
        data = read_image(source)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        return str(target)

    def put(self, data: bytes) -> str:
        """A public file of PNG bytes made here (a prompt-lab preview clip), named by its hash."""
        target = self.root / f"{sha256(data)}.png"
        if not target.is_file():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".part-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        return str(target)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class TempFiles:
    """A private temporary folder for downloads (exports, LoRA zips): each download gets its own
    subfolder; those older than ``keep_s`` go at the next download, and all of them at ``close``.
    (Gradio copies a returned file into its own cache before sending it.)"""

    def __init__(self, keep_s: float = 300.0):
        self.root = Path(tempfile.mkdtemp(prefix="rlr-downloads-"))
        self.keep_s = keep_s
        self._lock = threading.Lock()

    def new_folder(self) -> Path:
        with self._lock:
            now = time.time()
            for old in self.root.iterdir():
                try:
                    if now - old.stat().st_mtime > self.keep_s:
                        shutil.rmtree(old, ignore_errors=True)
                except FileNotFoundError:
                    pass
            return Path(tempfile.mkdtemp(dir=self.root))

    def folders(self) -> list[Path]:
        return sorted(self.root.iterdir()) if self.root.exists() else []

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) is ``folder`` or lies under it."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


class PathScrubber:
    """Replaces absolute server paths in public responses by names relative to their root."""

    def __init__(self, roots: dict[str, Path]):
        # Longest first, so that a data folder inside the repository keeps its own name.
        pairs = []
        for name, root in roots.items():
            for form in {str(Path(root)), str(Path(root).resolve())}:
                if form not in ("", ".", "/"):
                    pairs.append((form, name))
        self.pairs = sorted(pairs, key=lambda p: -len(p[0]))

    def text(self, value: str) -> str:
        for form, name in self.pairs:
            if form in value:
                value = value.replace(form, name)
        return value

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        return value
