"""The app's API through gradio_client: each action works, and bad input is refused clearly
without changing anything it should not."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
AppError = gradio_client.exceptions.AppError


@pytest.fixture(scope="module")
def app(running_app):
    return running_app


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def samples(client):
    return client.predict("a small blue square, white background", 3, 7, 4, 3.0, api_name="/generate")


def call(client, endpoint: str, *args, **kwargs):
    return client.predict(*args, api_name=f"/{endpoint}", **kwargs)


def refused(client, endpoint: str, *args, match: str, **kwargs) -> None:
    with pytest.raises(AppError, match=match):
        call(client, endpoint, *args, **kwargs)


def test_every_action_is_a_named_endpoint(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    expected = {"ping", "generate", "samples_to_rate", "rate", "next_pair", "compare", "split_prompt",
                "save_stage_prompts", "set_stage_settings", "preview_stages", "train_start", "train_status",
                "train_stop", "set_auto_train", "versions", "set_active_version", "rollback", "export_lora",
                "counts", "rater_stats", "export_data", "import_data"}
    assert {f"/{n}" for n in expected} <= names
    assert call(client, "ping") == {"ok": True}


def test_generate_returns_samples_with_version_and_image(samples):
    assert len(samples) == 3
    s = samples[0]
    assert s["version"] == "v0 (base)" and s["prompt"] == "a small blue square, white background" and s["seed"] == 7
    image = Image.open(io.BytesIO(base64.b64decode(s["image_png_b64"])))
    assert image.size == (32, 32)
    assert "image_file" not in s  # server paths stay on the server


def test_rate_and_compare_record_answers(client, app, samples):
    ids = [s["sample_id"] for s in samples]
    out = call(client, "rate", ids[0], 5, "bob")
    assert out["stars"] == 5
    assert call(client, "rate", ids[0], 3, "bob")["rating_id"] == out["rating_id"]  # a change of mind
    assert [r["stars"] for r in app.services.store.db["ratings"].rows_where("rater_id = 'bob'")] == [3]
    queue = call(client, "samples_to_rate", "bob", 8)
    assert ids[0] not in {s["sample_id"] for s in queue} and ids[1] in {s["sample_id"] for s in queue}
    pair = call(client, "next_pair", "bob")
    assert pair["prompt"] == samples[0]["prompt"]
    res = call(client, "compare", pair["left"]["sample_id"], pair["right"]["sample_id"], "right", "bob", 1.25)
    assert res["my_comparisons"] == 1
    row = next(app.services.store.db["comparisons"].rows_where("rater_id = 'bob'"))
    assert row["response_time_s"] == 1.25 and row["outcome"] == "right"


def test_prompt_lab_endpoints(client, app):
    stages = call(client, "split_prompt", "a large red circle on the left, black background")
    assert stages == {"coarse": "a large shape on the left, black background",
                      "mid": "a large circle on the left, black background",
                      "fine": "a large red circle on the left, black background"}
    saved = call(client, "save_stage_prompts", "a large red circle on the left, black background",
                 stages["coarse"], "a large circle, black background", stages["fine"], "bob")
    assert saved["stage_prompts"]["mid"] == "a large circle, black background"
    out = call(client, "preview_stages", "a red circle", "a shape", "a circle", "a red circle", 0.3, 0.6, 1, 4)
    assert len(out["plain"]) == len(out["staged"]) == 3 and sum(out["stage_steps"]) == 4
    assert call(client, "set_stage_settings", 0.25, 0.5, "fine") == {"boundaries": [0.25, 0.5],
                                                                     "focus_stage": "fine"}
    assert app.services.state.get().focus_stage == "fine"
    call(client, "set_stage_settings", 0.3, 0.6, "all")


def test_versions_data_and_training_guards(client):
    versions = call(client, "versions")
    assert versions[0]["name"] == "v0 (base)" and versions[0]["active"]
    assert call(client, "counts")["samples"] >= 3
    assert any(r["rater_id"] == "bob" for r in call(client, "rater_stats"))
    assert call(client, "train_status")["state"] == "idle"
    refused(client, "rollback", "", match="base model")
    refused(client, "export_lora", versions[0]["version_id"], match="no LoRA weights")
    refused(client, "train_start", {"estimator": "sgd"}, "", match="estimator must be one of")
    refused(client, "train_start", {"batch_size": 1}, "", match="batch size")
    refused(client, "train_start", {"estimatr": "ddpo"}, "", match="unknown round setting")  # a typo is not ignored
    assert call(client, "train_status")["state"] == "idle"  # nothing started
    path = call(client, "export_data")
    assert str(path).endswith(".zip")


BAD_PROMPTS = [("", "empty"), ("   ", "empty"), ("a red circle " * 770, "limit is 500"),
               ("x" * 10_000, "limit is 500"), ("a red dragon", "unknown word: dragon")]


@pytest.mark.parametrize("prompt,match", BAD_PROMPTS)
def test_bad_prompts_are_refused_and_nothing_is_stored(client, app, prompt, match):
    before = app.services.data.counts()
    refused(client, "generate", prompt, 2, 0, 4, 3.0, match=match)
    refused(client, "split_prompt", prompt, match=match)
    assert app.services.data.counts() == before


@pytest.mark.parametrize("args,match", [
    ((0, 0, 4, 3.0), "number of images"), ((17, 0, 4, 3.0), "number of images"),
    ((2, -1, 4, 3.0), "seed"), ((2, 0, 1, 3.0), "steps"), ((2, 0, 1000, 3.0), "steps"),
    ((2, 0, 4, 50.0), "guidance"), ((2.5, 0, 4, 3.0), "whole number"),
])
def test_out_of_range_generation_settings(client, app, args, match):
    before = app.services.data.counts()
    refused(client, "generate", "a red circle", *args, match=match)
    assert app.services.data.counts() == before


def test_bad_ratings_and_comparisons_change_nothing(client, app, samples):
    sid = samples[1]["sample_id"]
    before = app.services.data.counts()
    refused(client, "rate", 999_999, 4, "carol", match="no sample with id 999999")
    refused(client, "rate", sid, 0, "carol", match="stars must be a whole number from 1 to 5")
    refused(client, "rate", sid, 6, "carol", match="stars")
    refused(client, "rate", sid, 4, "", match="enter your name")
    refused(client, "rate", sid, 4, "x" * 500, match="rater name")
    refused(client, "compare", sid, sid, "left", "carol", match="two different samples")
    refused(client, "compare", sid, 999_999, "left", "carol", match=r"no sample \(right\) with id 999999")
    refused(client, "compare", sid, samples[2]["sample_id"], "sideways", "carol", match="outcome must be one of")
    refused(client, "compare", sid, samples[2]["sample_id"], "left", "carol", -3.0, match="response time")
    refused(client, "save_stage_prompts", "a red circle", "a shape", "a wobbly circle", "a red circle", "carol",
            match="mid stage prompt: unknown word")
    refused(client, "set_stage_settings", 0.7, 0.3, "mid", match="boundaries")
    refused(client, "set_active_version", 999, "", match="no model version with id 999")
    assert app.services.data.counts() == before


def test_concurrent_double_clicks_record_one_answer(client, app, samples):
    sid, other = samples[2]["sample_id"], samples[0]["sample_id"]
    before = app.services.data.counts()
    with cf.ThreadPoolExecutor(4) as pool:
        rates = [pool.submit(call, client, "rate", sid, 4, "dave") for _ in range(4)]
        cmps = [pool.submit(call, client, "compare", sid, other, "left", "dave", 0.5) for _ in range(4)]
        results = [f.result() for f in rates + cmps]
    assert len({r["rating_id"] for r in results[:4]}) == 1
    assert len({r["comparison_id"] for r in results[4:]}) == 1
    after = app.services.data.counts()
    assert after["ratings"] == before["ratings"] + 1 and after["comparisons"] == before["comparisons"] + 1


def test_public_app_guards_model_changes_but_not_rating(tmp_path, builtin_backend, monkeypatch):
    from app.config import AppConfig
    from app.errors import NotAllowed
    from app.services import AppServices

    services = AppServices(AppConfig(data_dir=tmp_path, public=True, admin_password="s3cret"), builtin_backend)
    try:
        sample = services.generation.generate("a red circle", 1, 0, 3, 3.0)[0]
        services.judgements.rate(sample["sample_id"], "eve", 4)  # rating stays open
        with pytest.raises(NotAllowed, match="admin password"):
            services.rounds.set_auto_train(5, "wrong")
        with pytest.raises(NotAllowed, match="admin password"):
            services.model_versions.set_active(services.model_versions.active(), None)
        with pytest.raises(NotAllowed):
            services.data.import_data(tmp_path / "x.zip", "")
        assert services.rounds.set_auto_train(5, "s3cret") == 5
    finally:
        services.close()
    nopass = AppServices(AppConfig(data_dir=tmp_path / "b", public=True), builtin_backend)
    try:
        with pytest.raises(NotAllowed, match="no admin password set"):
            nopass.rounds.stop("anything")
    finally:
        nopass.close()
