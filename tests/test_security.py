"""A public app probed as an attacker would: no data-folder file is served, no server path is
shown, no rating is lost to a file request, nobody rates as someone else, imports and exports
are bounded and guarded, and bad settings and text are refused with a message."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from app.errors import AppError, NotAllowed

gradio_client = pytest.importorskip("gradio_client")
ClientError = gradio_client.exceptions.AppError
PASSWORD = "s3cret-admin"


@pytest.fixture(scope="module")
def public_app(tmp_path_factory, builtin_backend):
    from app.config import AppConfig
    from app.server import start

    app = start(AppConfig(data_dir=tmp_path_factory.mktemp("public-data"), port=0, public=True,
                          admin_password=PASSWORD), builtin_backend)
    yield app
    app.close()


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
    sample = services.sample(samples[0]["sample_id"])
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
    vid = services.store.add_model_version("v-old", parent_id=services.active_version_id,
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
def _export_with_weights_path(tmp_path: Path, weights_path: str) -> Path:
    from feedback_store import FeedbackStore
    from feedback_store.images import sha256

    with FeedbackStore(tmp_path / "src") as src:
        base = src.add_model_version("base")
        src.add_model_version("v1", parent_id=base, weights_path="versions/round-1")
        out = src.export_folder(tmp_path / "export")
    table = out / "model_versions.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows[1]["weights_path"] = weights_path
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    table.write_text(text)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["model_versions.jsonl"] = sha256(text.encode())  # checksums recomputed
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("weights_path", ["/etc", "../../etc", "versions/../../etc", "C:\\x", "a\x00b"])
def test_import_refuses_weights_outside_the_data_folder(tmp_path, weights_path):
    from feedback_store import FeedbackStore, ImportFormatError

    folder = _export_with_weights_path(tmp_path, weights_path)
    with FeedbackStore(tmp_path / "dst") as dst:
        with pytest.raises(ImportFormatError, match="weights_path"):
            dst.import_folder(folder)
        assert not any(dst.counts().values())


def test_a_version_pointing_outside_is_never_loaded_or_zipped(tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices

    services = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    try:
        vid = services.store.add_model_version("evil", parent_id=services.active_version_id,
                                               weights_path="/etc")
        with pytest.raises(AppError, match="outside this app's data folder"):
            services.export_lora(vid)
        with pytest.raises(AppError, match="outside this app's data folder"):
            services.set_active_version(vid)
        assert services.generate("a red circle", 1, 0, 3, 3.0)[0]["version"] == "v0 (base)"
    finally:
        services.close()


# ---------------------------------------------------------------------------- hole 4: identity
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
    agreement = public_app.services.rater_agreement()
    assert not {r["rater_a"] for r in agreement} & raw


def test_browser_identity_on_a_space(tmp_path, builtin_backend, monkeypatch):
    """On a Space the rater is a server-side state set at page load from the HF sign-in (or a
    guest token kept in the browser); a signed-in admin's page gets an admin key."""
    import types

    import gradio as gr
    import gradio.oauth
    from gradio.helpers import special_args

    from app.config import AppConfig
    from app.ui import create_app

    # What a Space provides (sign-in routes need a client id and secret).
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "someone/rlr")
    monkeypatch.setattr(gradio.oauth, "OAUTH_CLIENT_ID", "client-id")
    monkeypatch.setattr(gradio.oauth, "OAUTH_CLIENT_SECRET", "client-secret")
    monkeypatch.setattr(gradio.oauth, "OAUTH_SCOPES", "openid profile")
    monkeypatch.setattr(gradio.oauth, "OPENID_PROVIDER_URL", "https://huggingface.co")
    config = AppConfig(data_dir=tmp_path / "data", public=True, space=True, admins=("carol",))
    demo, services = create_app(config, builtin_backend)
    try:
        assert any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())
        rater_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "rater")
        assert not isinstance(rater_box, gr.Textbox)  # nothing to type a name into
        load = next(f for f in demo.fns.values() if f.name == "load_identity")
        assert isinstance(load.outputs[0], gr.State)
        # Gradio injects the profile from the signed session cookie, not from anything the page sends.
        userinfo = {"preferred_username": "dave", "name": "Dave", "profile": "", "picture": ""}
        request = types.SimpleNamespace(session={"oauth_info": {"userinfo": userinfo,
                                                                "expires_at": time.time() + 60}})
        args = special_args(load.fn, inputs=["rt-" + "ab" * 16], request=request)[0]
        assert args[0] == "rt-" + "ab" * 16 and args[1].username == "dave"
        rater, kept, text, key, _ = load.fn(*args)
        assert rater == "dave" and "dave" in text and key is not None and not isinstance(key, str)
        signed_out = special_args(load.fn, inputs=["x"], request=types.SimpleNamespace(session={}))[0]
        assert signed_out == ["x", None]
        rater, kept, text, key, _ = load.fn("guest-typed-by-hand", None)
        assert rater.startswith("guest-") and len(rater) == 6 + 32 and kept.startswith("rt-")
        assert load.fn(kept, None)[0] == rater  # the same browser stays the same guest
        admin = gr.OAuthProfile({"preferred_username": "carol", "name": "", "profile": "", "picture": ""})
        key = load.fn("", admin)[3]
        assert isinstance(key, str) and key.startswith("admin-key-")
        services.check_admin(key)  # an admin key works where the password is asked for
        with pytest.raises(NotAllowed):
            services.check_admin("admin-key-" + "x" * 43)
    finally:
        services.close()


# ---------------------------------------------------------------------------- hole 5: the rest
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


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_import_is_bounded_before_anything_is_unpacked(tmp_path):
    import zipfile

    from app import archive

    bomb = _zip(tmp_path / "bomb.zip", {"manifest.json": b"{}", "images/zeros.png": b"\0" * (96 << 20)})
    assert bomb.stat().st_size < 200_000
    dest = tmp_path / "out"
    dest.mkdir()
    with zipfile.ZipFile(bomb) as zf:
        with pytest.raises(AppError, match="unpacks to .* the limit is"):
            archive.extract(zf, dest, max_bytes=16 << 20)
        with pytest.raises(AppError, match="compressed"):
            archive.extract(zf, dest, max_bytes=1 << 30, archive_size=bomb.stat().st_size)
    many = _zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(50)})
    with zipfile.ZipFile(many) as zf, pytest.raises(AppError, match="50 entries; the limit is 10"):
        archive.extract(zf, dest, max_files=10)
    for name in ("../evil", "/abs", "a/../../b"):
        bad = _zip(tmp_path / "bad.zip", {name: b"x"})
        with zipfile.ZipFile(bad) as zf, pytest.raises(AppError, match="unsafe path"):
            archive.extract(zf, dest)
    assert list(dest.iterdir()) == []  # nothing was unpacked


def raw_call(app, endpoint: str, data: list) -> str:
    """An endpoint called over plain HTTP, as any client can (no gradio_client uploads)."""
    req = urllib.request.Request(f"{app.url}gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{app.url}gradio_api/call/{endpoint}/{event}", timeout=60) as r:
        return r.read().decode()


def test_api_import_never_opens_a_file_already_on_the_server(public_app, client, tmp_path):
    before = public_app.services.counts()
    for path in (public_app.services.store.db_path, Path("/etc/passwd")):
        answer = raw_call(public_app, "import_data", [{"path": str(path), "meta": {"_type": "gradio.FileData"}},
                                                      PASSWORD])
        assert answer.startswith("event: error")
    assert public_app.services.counts() == before
    upload = gradio_client.handle_file(str(_zip(tmp_path / "x.zip", {"a.txt": b"x"})))
    with pytest.raises(ClientError, match="no manifest.json"):  # an upload does reach the import
        client.predict(upload, PASSWORD, api_name="/import_data")


def test_import_refuses_a_zip_bomb_through_the_app(public_app, tmp_path):
    bomb = _zip(tmp_path / "bomb.zip", {"manifest.json": b"{}", "images/zeros.png": b"\0" * (128 << 20)})
    with pytest.raises(AppError, match="compressed"):
        public_app.services.import_data(bomb, PASSWORD)
    with pytest.raises(AppError, match="uploaded"):  # never the data folder's own files
        public_app.services.import_data(public_app.services.store.db_path, PASSWORD)


@pytest.mark.parametrize("settings,match", [
    ({"bogus_key": 1}, "unknown setting 'bogus_key'"), ({"steps": 1, "lr": 0.1}, "unknown setting 'lr'"),
    ([1, 2], "must be a JSON object"), ("steps=3", "must be a JSON object"), (7, "must be a JSON object"),
])
def test_train_start_refuses_unknown_or_malformed_settings(public_app, client, settings, match):
    with pytest.raises(ClientError, match=match):
        client.predict(settings, PASSWORD, api_name="/train_start")
    assert client.predict(api_name="/train_status")["state"] == "idle"


@pytest.mark.parametrize("prompt", ["a red\x00 circle", "a red circle\x07", "a\x1b[31m red circle"])
def test_control_characters_in_prompts_are_refused(client, public_app, token, prompt):
    before = public_app.services.counts()
    with pytest.raises(ClientError, match="control character"):
        client.predict(prompt, 1, 0, 3, 3.0, api_name="/generate")
    with pytest.raises(ClientError, match="control character"):
        client.predict(prompt, api_name="/split_prompt")
    with pytest.raises(ClientError, match="control character"):
        client.predict("a red circle", "a shape", "a circle", prompt, token["rater_token"],
                       api_name="/save_stage_prompts")
    assert public_app.services.counts() == before


def test_wrong_admin_passwords_lock_the_door_for_a_while():
    from app.admin_guard import FREE_TRIES, AdminGuard

    now = [1000.0]
    guard = AdminGuard(public=True, password="right", clock=lambda: now[0])
    for _ in range(FREE_TRIES):
        with pytest.raises(NotAllowed, match="admin password"):
            guard.check("wrong")
    with pytest.raises(NotAllowed, match="too many wrong admin passwords"):
        guard.check("right")  # even the right one, until the lock runs out
    now[0] += 2.5
    guard.check("right")  # a right one resets the count
    for _ in range(FREE_TRIES):
        with pytest.raises(NotAllowed, match="admin password"):
            guard.check("wrong")
    now[0] += 2.5  # the 2 s lock ran out; one more wrong password locks for 4 s
    with pytest.raises(NotAllowed, match="admin password"):
        guard.check("wrong")
    now[0] += 3.0
    with pytest.raises(NotAllowed, match="too many"):
        guard.check("right")
    now[0] += 1.5
    guard.check("right")
    assert AdminGuard(public=False, password=None).check("anything") is None


def test_wrong_passwords_through_the_api_are_slowed_down(tmp_path, builtin_backend):
    from app.admin_guard import FREE_TRIES
    from app.config import AppConfig
    from app.services import AppServices

    services = AppServices(AppConfig(data_dir=tmp_path / "d", public=True, admin_password="pw"), builtin_backend)
    try:
        for _ in range(FREE_TRIES):
            with pytest.raises(NotAllowed):
                services.rounds.set_auto_train(1, "guess")
        with pytest.raises(NotAllowed, match="too many"):
            services.rounds.set_auto_train(1, "pw")
    finally:
        services.close()


def test_a_stopped_round_leaves_no_files(tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.rounds import RoundSettings
    from app.services import AppServices

    services = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    try:
        ids = [s["sample_id"] for s in services.generate("a blue circle", 2, 0, 3, 3.0)]
        services.rate(ids[0], "ann", 5)
        services.rate(ids[1], "ann", 1)
        services.rounds.start(RoundSettings.parse(steps=500, batch_size=2, sampling_steps=3, seed=0))
        end = time.time() + 120
        while not services.rounds.status()["history"]:
            assert time.time() < end, services.rounds.status()
            time.sleep(0.2)
        services.rounds.stop()
        assert services.worker.wait(60)
        assert services.rounds.status()["state"] == "stopped"
        versions = services.data_dir / "versions"
        assert not versions.exists() or list(versions.iterdir()) == []
    finally:
        services.close()
    # A folder a killed process left behind goes at the next start.
    orphan = tmp_path / "data" / "versions" / "round-9"
    orphan.mkdir(parents=True)
    (orphan / "adapter_model.safetensors").write_bytes(b"x")
    services = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    services.close()
    assert not orphan.exists()


def test_space_and_admins_come_from_the_environment(monkeypatch):
    from app.config import parse_args

    monkeypatch.setenv("SPACE_ID", "someone/rlr")
    monkeypatch.setenv("RLR_ADMINS", "carol, dave ,")
    config = parse_args(["--device", "cpu"])
    assert config.public and config.space and config.admins == ("carol", "dave")
    monkeypatch.delenv("SPACE_ID")
    local = parse_args(["--device", "cpu"])
    assert not local.public and not local.space


def test_server_paths_are_replaced_in_public_answers(tmp_path):
    from app.files import PathScrubber

    scrub = PathScrubber({"<data>": tmp_path / "data", "<app>": tmp_path})
    answer = {"error": f"OSError: [Errno 28] No space left on device: '{tmp_path}/data/versions/round-2'",
              "list": [str(tmp_path / "models" / "x"), 3, None]}
    assert scrub(answer) == {"error": "OSError: [Errno 28] No space left on device: '<data>/versions/round-2'",
                             "list": ["<app>/models/x", 3, None]}
