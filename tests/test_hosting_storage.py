"""Hosted data: the no-bucket banner, the SQLite check of RLR_DATA_DIR, and pushing an export to
the Hub. No Hub is reachable here: the push is tested up to the network (token, repo name, the
error a failed upload gives, no temporary files left), not against the real Hub."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from app import hub_export, storage
from app.errors import AppError


def test_banner_only_on_a_space_without_a_bucket(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("RLR_DATA_DIR", raising=False)
    assert storage.storage_warning(tmp_path) is None  # a local app: nothing to warn about
    monkeypatch.setenv("SPACE_ID", "someone/app")
    assert "wiped when the Space restarts" in storage.storage_warning(tmp_path)
    monkeypatch.setenv("RLR_DATA_DIR", str(tmp_path))
    assert storage.storage_warning(tmp_path) is None


def test_sqlite_check_of_the_data_folder(tmp_path: Path, monkeypatch) -> None:
    assert storage.sqlite_problem(tmp_path / "fresh") is None
    assert not list((tmp_path / "fresh").iterdir())  # the check leaves nothing behind
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    problem = storage.sqlite_problem(blocker)
    assert problem and "Error" in problem
    monkeypatch.setenv("SPACE_ID", "someone/app")
    monkeypatch.setenv("RLR_DATA_DIR", str(blocker))
    assert "cannot hold the ratings database" in storage.storage_warning(blocker)


@pytest.mark.parametrize("bad", ["", "noslash", "a/b/c", "../x/y", "a/..", "owner/na me", 42, None, "x" * 300])
def test_repo_ids_are_checked(bad) -> None:
    with pytest.raises(AppError, match="owner/name"):
        hub_export.check_repo_id(bad)


def test_push_needs_a_token(running_app, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(AppError, match="HF_TOKEN"):
        hub_export.push_export(running_app.services, "me/rlr-data")


def exports_in_tmp() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("rlr-export-*")}


def test_a_failed_upload_says_why_and_leaves_no_export_behind(running_app, monkeypatch) -> None:
    import huggingface_hub.constants

    # Nothing listens on port 9: the upload fails as it would without network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    before = exports_in_tmp()
    with pytest.raises(AppError, match="could not push the export to the Hub dataset me/rlr-data"):
        hub_export.push_export(running_app.services, "me/rlr-data", token="hf_not_a_real_token")
    assert exports_in_tmp() == before


def test_the_api_endpoint_answers_with_the_message(running_app, monkeypatch) -> None:
    from gradio_client import Client

    monkeypatch.delenv("HF_TOKEN", raising=False)
    client = Client(running_app.url, verbose=False)
    with pytest.raises(Exception, match="HF_TOKEN"):
        client.predict("me/rlr-data", "", api_name="/push_to_hub")
    with pytest.raises(Exception, match="owner/name"):
        client.predict("not a repo", "", api_name="/push_to_hub")


def test_zerogpu_detection_and_chunk_seconds(monkeypatch) -> None:
    from app import zerogpu

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.delenv("RLR_CHUNKED_TRAINING", raising=False)
    monkeypatch.delenv("RLR_GPU_CHUNK_SECONDS", raising=False)
    assert not zerogpu.on_zero_gpu() and not zerogpu.chunked_training()
    assert zerogpu.chunk_seconds() == 60.0
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu.on_zero_gpu() and zerogpu.chunked_training()
    monkeypatch.setenv("RLR_GPU_CHUNK_SECONDS", "45")
    assert zerogpu.chunk_seconds() == 45.0
    for bad in ("soon", "0", "-5", "99999"):
        monkeypatch.setenv("RLR_GPU_CHUNK_SECONDS", bad)
        with pytest.raises(AppError, match="RLR_GPU_CHUNK_SECONDS"):
            zerogpu.chunk_seconds()


def test_an_admin_on_a_public_app_gets_past_every_admin_check(tmp_path, builtin_backend, monkeypatch) -> None:
    """The push exports with the admin's password too: with it, the only failure left is the upload."""
    import huggingface_hub.constants

    from app.config import AppConfig
    from app.services import AppServices

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    services = AppServices(AppConfig(data_dir=tmp_path / "data", public=True, admin_password="pw"), builtin_backend)
    try:
        with pytest.raises(AppError, match="could not push the export"):
            hub_export.push_export(services, "me/rlr-data", password="pw", token="hf_not_a_real_token")
    finally:
        services.close()
