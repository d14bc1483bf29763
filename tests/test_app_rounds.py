"""Training rounds through the service layer: stop, failure, auto-train, versions, export."""

from __future__ import annotations

import json
import zipfile

import pytest

from app.errors import AppError
from app.round_config import RoundConfig

TINY = {"steps": 1, "batch_size": 2, "sampling_steps": 4, "samples_per_prompt": 1, "sample_steps": 4, "seed": 0}


@pytest.fixture()
def services(tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices

    s = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    yield s
    s.close()


def judge(services, rater: str = "ann") -> list[int]:
    samples = services.generation.generate("a blue circle", 3, 0, 3, 3.0)
    ids = [x["sample_id"] for x in samples]
    for sid, stars in zip(ids, [1, 3, 5]):
        services.judgements.rate(sid, rater, stars)
    services.judgements.compare(ids[0], ids[2], "right", rater, 1.0)
    return ids


def wait(services, timeout: float = 120) -> dict:
    assert services.worker.wait(timeout), "the round did not end"
    return services.rounds.status()


def test_a_round_needs_judgements_first(services):
    with pytest.raises(AppError, match="rate or compare a few samples first"):
        services.rounds.start(RoundConfig.parse(TINY))
    assert services.store.training_rounds() == []


def test_round_makes_a_version_that_can_be_rolled_back_and_exported(services, tmp_path):
    judge(services)
    services.rounds.start(RoundConfig.parse(TINY))
    status = wait(services)
    assert status["state"] == "finished", status
    assert status["prompts"] == [{"prompt": "a blue circle", "stages": None, "source": "generated"}]
    v1 = status["version_id"]
    assert services.model_versions.active() == v1
    services.rounds.start(RoundConfig.parse({**TINY, "steps": 200}))
    with pytest.raises(AppError, match="already running"):  # one round at a time
        services.rounds.start(RoundConfig.parse(TINY))
    services.rounds.stop()
    stopped = wait(services)
    assert stopped["state"] == "stopped"
    rounds = services.store.training_rounds()
    assert [r["state"] for r in rounds] == ["finished", "failed"] and "stopped" in rounds[1]["error"]
    assert services.model_versions.active() == v1  # a stopped round changes nothing

    archive = services.model_versions.export_lora(v1)
    with zipfile.ZipFile(archive) as zf:
        assert {"pytorch_lora_weights.safetensors", "config.json"} <= set(zf.namelist())
    new = services.generation.generate("a blue circle", 1, 5, 3, 3.0)[0]
    assert new["version"].startswith("v1")
    assert services.model_versions.rollback()["name"] == "v0 (base)"
    assert services.generation.generate("a blue circle", 1, 5, 3, 3.0)[0]["version"] == "v0 (base)"
    with pytest.raises(AppError, match="nothing to roll back"):
        services.model_versions.rollback()
    services.model_versions.set_active(v1)
    table = {v["version_id"]: v for v in services.model_versions.table()}
    assert table[v1]["active"] and table[v1]["estimator"] == "rlr" and table[v1]["parent_id"] == 1


def test_auto_train_starts_a_round_after_n_new_judgements(services):
    ids = judge(services)
    services.rounds.start(RoundConfig.parse(TINY))
    assert wait(services)["state"] == "finished"
    assert services.rounds.set_auto_train(2) == 2
    services.judgements.rate(ids[0], "bo", 2)
    assert not services.worker.status().active
    services.judgements.rate(ids[1], "bo", 4)  # the 2nd new judgement starts a round, with the last settings
    assert services.worker.status().job_id == 2  # a second job was started (it may have finished already)
    assert wait(services)["state"] == "finished"
    assert [r["state"] for r in services.store.training_rounds()] == ["finished", "finished"]
    assert services.store.training_rounds()[1]["config"]["steps"] == TINY["steps"]


def test_stage_prompts_from_the_prompt_lab_reach_the_round(services):
    judge(services)
    services.prompt_lab.save_stage_prompts("a blue circle", "a shape", "a circle", "a blue circle", "ann")
    services.prompt_lab.set_stage_settings(0.3, 0.5, "coarse")  # not the default boundaries (0.3, 0.6)
    services.rounds.start(RoundConfig.parse({**TINY, "sampling_steps": 10}))
    status = wait(services)
    assert status["state"] == "finished", status
    assert status["prompts"][0] == {"prompt": "a blue circle", "stages": ["a shape", "a circle", "a blue circle"],
                                    "source": "prompt lab"}
    assert status["window"] == [8, 10]  # the coarse stage of a 10-step chain, in k = K..1
    # the version records what the round trained with: the lab's stages, boundaries and window
    version = services.store.get_model_version(status["version_id"])
    training = json.loads((services.data_dir / version["weights_path"] / "config.json").read_text())["training"]
    assert training["stage_boundaries"] == [0.3, 0.5]
    assert training["stage_prompts"] == {"a blue circle": ["a shape", "a circle", "a blue circle"]}
    assert training["estimator"]["options"]["window"] == [8, 10]


def test_export_and_import_into_a_fresh_data_directory(services, tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices

    judge(services)
    archive = services.data.export_data()
    fresh = AppServices(AppConfig(data_dir=tmp_path / "fresh"), builtin_backend)
    try:
        added = fresh.data.import_data(archive)
        assert added["ratings"] == 3 and added["comparisons"] == 1
        assert fresh.data.counts()["samples"] == 3
        with pytest.raises(Exception, match="empty"):
            fresh.data.import_data(archive)  # a second import would duplicate: refused
        with pytest.raises(AppError, match=".zip"):
            fresh.data.import_data(tmp_path / "nothing.zip")
    finally:
        fresh.close()

