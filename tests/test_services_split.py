"""The service layer split by concern (app/services/): reading the active version writes nothing,
the base version's row is made explicitly, and the tabs read the model through ``ModelInfo``."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from app.config import AppConfig
from app.services import BASE_VERSION_NAME, AppServices, ModelInfo

ROOT = Path(__file__).resolve().parent.parent


def test_reading_the_active_version_writes_nothing_and_the_base_row_is_made_on_demand(tmp_path, builtin_backend):
    services = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    try:
        versions = services.model_versions
        assert versions.active() is None and versions.table() == []
        assert not any(services.store.counts().values())  # a fresh store stays empty: it can take an import
        assert services.state.get().active_version_id is None
        vid = versions.ensure_base()
        assert versions.ensure_base() == vid == versions.active() == services.state.get().active_version_id
        assert [v["name"] for v in services.store.model_versions()] == [BASE_VERSION_NAME]
        sample = services.generation.generate("a red circle", 1, 0, 3, 3.0)[0]
        assert sample["version_id"] == vid and services.generation.sample(sample["sample_id"]) == sample
    finally:
        services.close()


def test_a_stale_state_file_is_put_right_at_start_up(tmp_path, builtin_backend):
    data = tmp_path / "data"
    first = AppServices(AppConfig(data_dir=data), builtin_backend)
    vid = first.model_versions.ensure_base()
    first.state.update(active_version_id=vid + 41)  # a version that does not exist
    first.close()
    again = AppServices(AppConfig(data_dir=data), builtin_backend)
    try:
        assert again.state.get().active_version_id == vid == again.model_versions.active()
    finally:
        again.close()


def test_model_info_is_a_fixed_copy_of_what_the_pages_read(builtin_backend):
    info = ModelInfo.of(builtin_backend)
    assert info.image_size == tuple(builtin_backend.image_size) and info.family == builtin_backend.family
    assert info.noun() == "image" and info.noun(plural=True) == "images" and not info.is_video
    assert info.anchor_prompts == len(builtin_backend.anchor_prompts) > 0
    assert info.device_summary().startswith(f"{builtin_backend.name} on cpu, float32, ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.is_video = True  # type: ignore[misc]


def test_tabs_do_not_reach_into_the_backend():
    """The tabs read the model through ``services.model`` (ModelInfo), never ``services.base_backend``."""
    bad = []
    for path in sorted((ROOT / "app" / "tabs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "base_backend":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []
