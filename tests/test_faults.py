"""Faults the app must survive with a clear message and nothing half-written: a damaged image
file, a full disk, and the database locked by another process for longer than the busy timeout.
(Killing the app mid-round is tests/test_app_crash.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest

from app.errors import AppError, user_errors
from feedback_store import StoreBusyError, StoreFullError


@pytest.fixture()
def make_services(builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices

    made = []

    def make(data_dir: Path) -> AppServices:
        made.append(AppServices(AppConfig(data_dir=data_dir), builtin_backend))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_damaged_image_file_gives_a_clear_error_and_the_app_goes_on(tmp_path, make_services):
    from app.api import public_sample

    services = make_services(tmp_path / "data")
    bad, good = (services.generation.generate("a red circle", 1, seed, 3, 3.0)[0] for seed in (1, 2))
    Path(bad["image_file"]).write_bytes(b"\x89PNG not really")  # damaged on disk
    with pytest.raises(AppError, match="damaged"):
        services.images.copy(bad["image_file"])  # what the UI would show
    with pytest.raises(AppError, match="damaged"):
        public_sample(bad)  # what the API would send
    assert any("does not match its hash" in p for p in services.store.verify())
    with pytest.raises(Exception, match="corrupt"):
        services.data.export_data()  # an export would carry the damage: it stops with a message
    # Everything else goes on: the other sample shows, ratings are taken, new samples are drawn.
    assert Path(services.images.copy(good["image_file"])).is_file()
    services.judgements.rate(bad["sample_id"], "ann", 2)
    services.judgements.rate(good["sample_id"], "ann", 4)
    assert services.generation.generate("a blue square", 1, 3, 3, 3.0)[0]["sample_id"] > good["sample_id"]
    assert services.data.counts()["ratings"] == 2


def reraise(err: BaseException) -> None:
    raise err


@pytest.fixture()
def tiny_disk(tmp_path):
    """A real full disk: a 2 MiB tmpfs (needs root, as in the project's containers and CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave: int) -> Path:
    """Fill the disk up to ``leave`` free bytes."""
    filler = mount / "filler"
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_refuses_clearly_and_writes_nothing_half(tiny_disk, make_services):
    services = make_services(tiny_disk / "data")
    first = services.generation.generate("a red circle", 2, 0, 3, 3.0)
    services.judgements.rate(first[0]["sample_id"], "ann", 3)
    filler = fill(tiny_disk, leave=24_000)
    error = None
    for seed in range(1, 200):  # draw until the disk is full
        try:
            services.generation.generate("a large green triangle on the right", 4, seed, 3, 3.0)
            services.judgements.rate(first[1]["sample_id"], "ann", 1 + seed % 5)
        except StoreFullError as err:
            error = err
            break
    assert error is not None, "the disk never filled up"
    with pytest.raises(gr.Error, match="disk .* is full: this was not saved"):
        user_errors(reraise)(error)  # as the browser and the API show it
    # Nothing half-written: every row's image is whole, no partial file is left.
    assert services.store.verify(check_hashes=True) == []
    leftovers = [p for p in (tiny_disk / "data").rglob("*") if p.name.startswith((".tmp-", ".state-"))]
    assert leftovers == []
    counts = services.data.counts()
    # Space again: the app goes on where it stopped.
    filler.unlink()
    more = services.generation.generate("a red circle", 1, 999, 3, 3.0)
    services.judgements.rate(more[0]["sample_id"], "bob", 5)
    assert services.data.counts()["samples"] == counts["samples"] + 1
    assert services.data.counts()["ratings"] == counts["ratings"] + 1
    assert services.store.verify(check_hashes=True) == []


HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO raters (id, kind, created_at) VALUES ('locker', 'person', 'now')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def test_a_database_locked_too_long_refuses_the_rating_clearly(tmp_path, make_services, monkeypatch):
    monkeypatch.setenv("RLR_BUSY_TIMEOUT_MS", "200")  # one attempt's wait; the store retries 8 times
    services = make_services(tmp_path / "data")
    sample = services.generation.generate("a red circle", 1, 0, 3, 3.0)[0]
    services.judgements.rate(sample["sample_id"], "ann", 4)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(services.store.db_path), "12"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        started = time.time()
        with pytest.raises(StoreBusyError, match="not saved, please try again"):
            services.judgements.rate(sample["sample_id"], "bob", 2)
        assert time.time() - started < 11  # refused while the other process still holds the lock
        with pytest.raises(gr.Error, match="busy"):
            user_errors(services.judgements.rate)(sample["sample_id"], "bob", 2)
    finally:
        holder.wait(timeout=30)
    assert services.store.star_rating(sample["sample_id"], "bob") is None  # refused means not stored
    services.judgements.rate(sample["sample_id"], "bob", 2)  # the lock is gone: the same rating goes in
    assert services.store.star_rating(sample["sample_id"], "bob") == 2
    assert services.data.counts()["ratings"] == 2
