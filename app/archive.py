"""Unpacking an uploaded export .zip without trusting it.

Before anything is written: the entry count and the total uncompressed size the archive
declares must be under the limits, and every name must be a plain relative path. While
unpacking, each entry is copied through a counter, so an entry that inflates past its
declared size (a lying header) stops the import too. Limits: ``RLR_IMPORT_MAX_BYTES``
(default 2 GiB) and ``RLR_IMPORT_MAX_FILES`` (default 200,000); and above 64 MiB an archive
may unpack to at most ``MAX_RATIO`` (50) times its own size: exports are mostly PNG images,
which do not compress, while a zip bomb unpacks to a thousand times its size.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from app.errors import AppError

MAX_BYTES = int(os.environ.get("RLR_IMPORT_MAX_BYTES", str(2 * 1024**3)))
MAX_FILES = int(os.environ.get("RLR_IMPORT_MAX_FILES", "200000"))
MAX_RATIO = 50
RATIO_FREE_BYTES = 64 << 20
CHUNK = 1 << 20


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return (name.startswith(("/", "\\")) or ".." in path.parts or ":" in name
            or any(ord(c) < 32 for c in name))


def check(zf: zipfile.ZipFile, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES,
          archive_size: int | None = None) -> None:
    """Refuse an archive that is too big, too many files, or has unsafe names (nothing unpacked)."""
    infos = zf.infolist()
    if len(infos) > max_files:
        raise AppError(f"refusing to import: the archive has {len(infos)} entries; the limit is {max_files}")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise AppError(f"refusing to import: the archive unpacks to {total:,} bytes; the limit is {max_bytes:,}")
    if archive_size is None and isinstance(zf.filename, str) and Path(zf.filename).is_file():
        archive_size = Path(zf.filename).stat().st_size
    if archive_size and total > max(RATIO_FREE_BYTES, MAX_RATIO * archive_size):
        raise AppError(f"refusing to import: the archive is compressed {total / archive_size:,.0f} times "
                       f"(it unpacks to {total:,} bytes); an export is compressed far less (limit {MAX_RATIO})")
    for info in infos:
        if _unsafe(info.filename):
            raise AppError(f"refusing to import: unsafe path {info.filename!r} in the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise AppError(f"refusing to import: {info.filename!r} is a symbolic link")


def extract(zf: zipfile.ZipFile, dest: Path, max_bytes: int = MAX_BYTES, max_files: int = MAX_FILES,
            archive_size: int | None = None) -> None:
    """Check the archive, then unpack it into ``dest`` counting every byte written."""
    check(zf, max_bytes, max_files, archive_size)
    total = sum(i.file_size for i in zf.infolist())
    free = shutil.disk_usage(dest).free
    if total > free:
        raise AppError(f"refusing to import: it unpacks to {total:,} bytes and the disk has {free:,} free")
    written = 0
    root = dest.resolve()
    for info in zf.infolist():
        target = (root / info.filename).resolve()
        if root not in target.parents and target != root:
            raise AppError(f"refusing to import: unsafe path {info.filename!r} in the archive")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                written += len(chunk)
                if size > info.file_size or written > max_bytes:
                    raise AppError("refusing to import: an entry unpacks to more than the archive declares")
                out.write(chunk)
