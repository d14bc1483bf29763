"""The feedback data as a whole: counts, per-rater statistics and agreement, export and import
(and a video app's clips as a Hugging Face ``videofolder``)."""

from __future__ import annotations

import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import files
from app.archive import extract as extract_archive
from app.errors import AppError
from app.identity import Identity
from feedback_store import FeedbackStore
from feedback_store.videofolder import export_videofolder


class Data:
    def __init__(self, store: FeedbackStore, identity: Identity, downloads: files.TempFiles, data_dir: Path,
                 authorise: Callable[[Any], None], is_video: bool = False):
        self.store = store
        self.identity = identity  # a public app shows raters by their public ids
        self.downloads = downloads
        self.data_dir = data_dir
        self.authorise = authorise
        self.is_video = is_video  # the samples are clips: they can go out as a videofolder

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def rater_stats(self) -> list[dict[str, Any]]:
        return self.identity.public_rows(self.store.rater_stats(), ("rater_id",))

    def rater_agreement(self) -> list[dict[str, Any]]:
        return self.identity.public_rows(self.store.rater_agreement(), ("rater_a", "rater_b"))

    def export_data(self, password: Any = None) -> Path:
        """Export the store to a zip file (a folder the store can import again, zipped)."""
        self.authorise(password)  # every rater's answers: admins only on a public app
        out = self.downloads.new_folder()
        folder = self.store.export_folder(out / "export")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        archive = shutil.make_archive(str(out / f"rlr-feedback-{stamp}"), "zip", root_dir=folder)
        shutil.rmtree(folder)
        return Path(archive)

    def export_videos(self, password: Any = None) -> Path:
        """The clips as a videofolder .zip (videos/*.avi, metadata.jsonl, comparisons.jsonl)."""
        self.authorise(password)  # every rater's answers, like the full export: admins only on a public app
        if not self.is_video:
            raise AppError("this app serves an image model: its samples are images, not clips (use Export)")
        out = self.downloads.new_folder()
        folder = export_videofolder(self.store, out / "videofolder")
        archive = shutil.make_archive(str(out / "rlr-clips-videofolder"), "zip", root_dir=folder)
        shutil.rmtree(folder)
        return Path(archive)

    def import_data(self, archive: Any, password: Any = None) -> dict[str, int]:
        self.authorise(password)
        if not archive:
            raise AppError("choose an export (.zip) to import")
        path = Path(str(archive))
        if files.inside(path, self.data_dir):  # never open the data folder's own files (SQLite locks)
            raise AppError("the file to import must be an uploaded .zip made by this app's export")
        if not path.is_file() or not zipfile.is_zipfile(path):
            raise AppError("the file to import must be a .zip made by this app's export")
        with tempfile.TemporaryDirectory(prefix="rlr-import-") as tmp:
            with zipfile.ZipFile(path) as zf:
                extract_archive(zf, Path(tmp))  # size, entry count and names checked first
            return self.store.import_folder(tmp)
