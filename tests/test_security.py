"""A public app probed as an attacker would, over HTTP: no data-folder file is served, no server
path is shown, no rating is lost to a file request, nobody rates as someone else, imports and exports
are bounded and guarded, and bad settings and text are refused with a message."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from app.errors import AppError
from tests.conftest import PUBLIC_ADMIN_PASSWORD
from tests.test_security_units import make_zip

gradio_client = pytest.importorskip("gradio_client")
ClientError = gradio_client.exceptions.AppError
PASSWORD = PUBLIC_ADMIN_PASSWORD  # the public_app fixture's (tests/conftest.py)


@pytest.fixture(scope="module")
def client(public_app):
    return gradio_client.Client(public_app.url, verbose=False)


@pytest.fixture(scope="module")
def token(client):
    return client.predict(api_name="/rater_token")


@pytest.fixture(scope="module")
def samples(client):
    return client.predict("a red circle", 2, 1, 3, 3.0, api_name="/generate")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def file_url(app, path: Path) -> str:
    return f"{app.url}gradio_api/file={urllib.parse.quote(str(path))}"


# ---------------------------------------------------------------------------- hole 1: files
def test_no_file_of_the_data_folder_is_served(public_app, client, token, samples):
    client.predict(samples[0]["sample_id"], 4, token["rater_token"], api_name="/rate")
    data = public_app.services.data_dir.resolve()
    files = [p for p in data.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"feedback.db", "app_state.json"} <= names and any(p.suffix == ".png" for p in files)
    for path in files:
        for form in (path, Path(str(path).replace(str(data), str(public_app.services.data_dir)))):
            status, body = get(file_url(public_app, form))
            assert status in (403, 404), (path, status)
            assert b"SQLite format" not in body


def test_the_ui_shows_hash_named_copies_outside_the_data_folder(public_app, samples):
    services = public_app.services
    sample = services.generation.sample(samples[0]["sample_id"])
    copy = Path(services.images.copy(sample["image_file"]))
    assert not copy.resolve().is_relative_to(services.data_dir.resolve())
    assert copy.name == Path(sample["image_file"]).name  # <sha256>.png
    assert copy.read_bytes() == Path(sample["image_file"]).read_bytes()
    with pytest.raises(AppError):  # only the store's content-addressed images
        services.images.copy(services.data_dir / "feedback.db")


def test_public_answers_hold_no_absolute_server_path(public_app, client):
    services = public_app.services
    # A version row as older apps wrote it: an absolute path into the data folder.
    folder = services.data_dir.resolve() / "versions" / "round-77"
    vid = services.store.add_model_version("v-old", parent_id=services.model_versions.ensure_base(),
                                           weights_path=str(folder))
    answers = [client.predict(api_name="/versions"), client.predict(api_name="/train_status"),
               client.predict(api_name="/rater_stats"), client.predict(api_name="/counts")]
    text = json.dumps(answers)
    assert str(services.data_dir.resolve()) not in text and str(services.data_dir) not in text
    row = next(v for v in answers[0] if v["version_id"] == vid)
    assert row["weights_path"] == "versions/round-77"
    with pytest.raises(ClientError) as err:
        client.predict(vid, api_name="/export_lora")
    assert str(services.data_dir.resolve()) not in str(err.value)


# ---------------------------------------------------------------------------- hole 2: locks
COUNT_RATINGS = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(conn.execute("SELECT count(*) FROM ratings").fetchone()[0])
conn.close()
"""


def test_a_file_request_for_the_database_loses_no_rating(tmp_path, builtin_backend):
    """Gradio opening feedback.db in the app's process used to drop its SQLite locks; a reader in
    another process then checkpointed and deleted the WAL under the running app."""
    from app.config import AppConfig
    from app.server import start
    from feedback_store import FeedbackStore

    app = start(AppConfig(data_dir=tmp_path / "data", port=0), builtin_backend)  # a local app, too
    try:
        client = gradio_client.Client(app.url, verbose=False)
        ids = [s["sample_id"] for s in client.predict("a red circle", 4, 0, 3, 3.0, api_name="/generate")]
        acknowledged = 0
        for sid in ids:
            client.predict(sid, 3, "ann", api_name="/rate")
            acknowledged += 1
        db = app.services.store.db_path.resolve()
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            assert get(file_url(app, path))[0] in (403, 404)
        subprocess.run([sys.executable, "-c", COUNT_RATINGS, str(db)], check=True, capture_output=True)
        for sid in ids:
            client.predict(sid, 5, "bob", api_name="/rate")
            acknowledged += 1
        # Another process sees every acknowledged rating (with the locks dropped, the first reader
        # deleted the WAL and the app went on writing into the unlinked file: this saw 4 of 8).
        seen = subprocess.run([sys.executable, "-c", COUNT_RATINGS, str(db)], check=True, capture_output=True)
        assert int(seen.stdout) == acknowledged
    finally:
        app.close()
    with FeedbackStore(tmp_path / "data") as store:
        assert store.counts()["ratings"] == acknowledged == 8


# ---------------------------------------------------------------------------- hole 3: import paths
def test_api_raters_need_a_token_and_cannot_rate_as_someone_else(public_app, client, token, samples):
    sid = samples[1]["sample_id"]
    for claimed in ("alice", token["rater_id"], "rt-" + "0" * 31):
        with pytest.raises(ClientError, match="rater token"):
            client.predict(sid, 2, claimed, api_name="/rate")
    assert token["rater_token"].startswith("rt-") and len(token["rater_token"]) == 3 + 32  # 128 bits
    out = client.predict(sid, 2, token["rater_token"], api_name="/rate")
    assert out["rater"] == token["rater_id"] != token["rater_token"]
    raters = {r["rater_id"] for r in public_app.services.store.db["ratings"].rows}
    assert token["rater_token"] not in raters and token["rater_id"] in raters
    other = client.predict(api_name="/rater_token")
    assert other["rater_token"] != token["rater_token"] and other["rater_id"] != token["rater_id"]


def test_public_statistics_show_no_raw_rater_ids(public_app, client, token, samples):
    client.predict(samples[0]["sample_id"], 5, token["rater_token"], api_name="/rate")
    stats = client.predict(api_name="/rater_stats")
    raw = {r["id"] for r in public_app.services.store.db["raters"].rows}
    shown = {r["rater_id"] for r in stats}
    assert shown and not shown & raw and all(s.startswith("rater-") for s in shown)
    agreement = public_app.services.data.rater_agreement()
    assert not {r["rater_a"] for r in agreement} & raw


def test_export_needs_the_admin_and_leaves_no_files(public_app, client):
    services = public_app.services
    with pytest.raises(ClientError, match="admin password"):
        client.predict("", api_name="/export_data")
    before = set(Path("/tmp").glob("rlr-export-*"))
    for _ in range(3):
        path = client.predict(PASSWORD, api_name="/export_data")
        assert str(path).endswith(".zip")
    assert set(Path("/tmp").glob("rlr-export-*")) == before
    root = services.downloads.root
    services.downloads.keep_s = 0.0
    services.downloads.new_folder()
    assert len(services.downloads.folders()) == 1  # older downloads removed
    services.downloads.keep_s = 300.0
    from app.files import TempFiles

    temp = TempFiles()
    temp.new_folder()
    temp.close()
    assert not temp.root.exists() and root.exists()


def raw_call(app, endpoint: str, data: list) -> str:
    """An endpoint called over plain HTTP, as any client can (no gradio_client uploads)."""
    req = urllib.request.Request(f"{app.url}gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{app.url}gradio_api/call/{endpoint}/{event}", timeout=60) as r:
        return r.read().decode()


def test_api_import_never_opens_a_file_already_on_the_server(public_app, client, tmp_path):
    before = public_app.services.data.counts()
    for path in (public_app.services.store.db_path, Path("/etc/passwd")):
        answer = raw_call(public_app, "import_data", [{"path": str(path), "meta": {"_type": "gradio.FileData"}},
                                                      PASSWORD])
        assert answer.startswith("event: error")
    assert public_app.services.data.counts() == before
    upload = gradio_client.handle_file(str(make_zip(tmp_path / "x.zip", {"a.txt": b"x"})))
    with pytest.raises(ClientError, match="no manifest.json"):  # an upload does reach the import
        client.predict(upload, PASSWORD, api_name="/import_data")


def test_import_refuses_a_zip_bomb_through_the_app(public_app, tmp_path):
    bomb = make_zip(tmp_path / "bomb.zip", {"manifest.json": b"{}", "images/zeros.png": b"\0" * (128 << 20)})
    with pytest.raises(AppError, match="compressed"):
        public_app.services.data.import_data(bomb, PASSWORD)
    with pytest.raises(AppError, match="uploaded"):  # never the data folder's own files
        public_app.services.data.import_data(public_app.services.store.db_path, PASSWORD)


@pytest.mark.parametrize("settings,match", [
    ({"bogus_key": 1}, "unknown round setting.*bogus_key"), ({"steps": 1, "lr": 0.1}, "unknown round setting.*: lr;"),
    ([1, 2], "must be an object"), ("steps=3", "must be an object"), (7, "must be an object"),
])
def test_train_start_refuses_unknown_or_malformed_settings(public_app, client, settings, match):
    with pytest.raises(ClientError, match=match):
        client.predict(settings, PASSWORD, api_name="/train_start")
    assert client.predict(api_name="/train_status")["state"] == "idle"


@pytest.mark.parametrize("prompt", ["a red\x00 circle", "a red circle\x07", "a\x1b[31m red circle"])
def test_control_characters_in_prompts_are_refused(client, public_app, token, prompt):
    before = public_app.services.data.counts()
    with pytest.raises(ClientError, match="control character"):
        client.predict(prompt, 1, 0, 3, 3.0, api_name="/generate")
    with pytest.raises(ClientError, match="control character"):
        client.predict(prompt, api_name="/split_prompt")
    with pytest.raises(ClientError, match="control character"):
        client.predict("a red circle", "a shape", "a circle", prompt, token["rater_token"],
                       api_name="/save_stage_prompts")
    assert public_app.services.data.counts() == before


def test_strangers_cannot_change_the_stage_settings_rounds_train_with(public_app, client):
    before = public_app.services.prompt_lab.stage_settings()
    with pytest.raises(ClientError, match="admin password"):
        client.predict(0.1, 0.2, "coarse", "", api_name="/set_stage_settings")
    assert public_app.services.prompt_lab.stage_settings() == before
    changed = client.predict(0.25, 0.5, "fine", PASSWORD, api_name="/set_stage_settings")
    assert changed == {"boundaries": [0.25, 0.5], "focus_stage": "fine"}
    client.predict(*before["boundaries"], before["focus_stage"], PASSWORD, api_name="/set_stage_settings")
