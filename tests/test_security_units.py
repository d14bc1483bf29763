"""The security checks that need no running server: import paths and bounds, the admin lockout,
sign-in on a Space, a stopped round's files, configuration and path scrubbing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.errors import AppError, NotAllowed


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
        vid = services.store.add_model_version("evil", parent_id=services.model_versions.ensure_base(),
                                               weights_path="/etc")
        with pytest.raises(AppError, match="outside this app's data folder"):
            services.model_versions.export_lora(vid)
        with pytest.raises(AppError, match="outside this app's data folder"):
            services.model_versions.set_active(vid)
        assert services.generation.generate("a red circle", 1, 0, 3, 3.0)[0]["version"] == "v0 (base)"
    finally:
        services.close()


# ---------------------------------------------------------------------------- hole 4: identity
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
        services.admin.check(key)  # an admin key works where the password is asked for
        with pytest.raises(NotAllowed):
            services.admin.check("admin-key-" + "x" * 43)
    finally:
        services.close()


# ---------------------------------------------------------------------------- hole 5: the rest
def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_import_is_bounded_before_anything_is_unpacked(tmp_path):
    import zipfile

    from app import archive

    bomb = make_zip(tmp_path / "bomb.zip", {"manifest.json": b"{}", "images/zeros.png": b"\0" * (96 << 20)})
    assert bomb.stat().st_size < 200_000
    dest = tmp_path / "out"
    dest.mkdir()
    with zipfile.ZipFile(bomb) as zf:
        with pytest.raises(AppError, match="unpacks to .* the limit is"):
            archive.extract(zf, dest, max_bytes=16 << 20)
        with pytest.raises(AppError, match="compressed"):
            archive.extract(zf, dest, max_bytes=1 << 30, archive_size=bomb.stat().st_size)
    many = make_zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(50)})
    with zipfile.ZipFile(many) as zf, pytest.raises(AppError, match="50 entries; the limit is 10"):
        archive.extract(zf, dest, max_files=10)
    for name in ("../evil", "/abs", "a/../../b"):
        bad = make_zip(tmp_path / "bad.zip", {name: b"x"})
        with zipfile.ZipFile(bad) as zf, pytest.raises(AppError, match="unsafe path"):
            archive.extract(zf, dest)
    assert list(dest.iterdir()) == []  # nothing was unpacked


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


def test_empty_passwords_are_refused_without_locking_the_admins_out():
    """A guest's model-changing click (nothing typed) is refused, but guesses nothing: it must not
    let any stranger lock the admin password by clicking."""
    from app.admin_guard import FREE_TRIES, AdminGuard

    guard = AdminGuard(public=True, password="right", clock=lambda: 1000.0)
    for _ in range(3 * FREE_TRIES):
        for empty in ("", None):
            with pytest.raises(NotAllowed, match="admin password"):
                guard.check(empty)
    guard.check("right")


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
    from app.round_config import RoundConfig
    from app.services import AppServices

    services = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    try:
        ids = [s["sample_id"] for s in services.generation.generate("a blue circle", 2, 0, 3, 3.0)]
        services.judgements.rate(ids[0], "ann", 5)
        services.judgements.rate(ids[1], "ann", 1)
        services.rounds.start(RoundConfig.parse({"steps": 500, "batch_size": 2, "sampling_steps": 3, "seed": 0}))
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
