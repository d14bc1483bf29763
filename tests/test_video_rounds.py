"""Training rounds on clips with every estimator, through the service layer: each learns its
reward from clip ratings and a clip comparison, makes a version, and draws its blind
before/after clip pairs; a stopped round leaves the active version and no files behind.
(RLR, the default, runs through the API in test_video_app.py.) Smallest settings."""

from __future__ import annotations

import pytest

from app.round_config import RoundConfig
from tests.clip_model import clip_model_dir

PROMPT = "a small yellow square moving up, navy background"
# The fidelity guard off: these rounds check each estimator's mechanics on clips, and a 2-step
# draw is no probe of fidelity (tests/test_fidelity_guard.py tests the guard, the clip judge too).
TINY = {"steps": 1, "batch_size": 2, "sampling_steps": 3, "samples_per_prompt": 1, "sample_steps": 2,
        "max_prompts": 1, "truncation": 1, "seed": 1, "fidelity_threshold": 0}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    from app.config import AppConfig
    from app.services import AppServices
    from rlr_core.backends.loading import load_backend

    s = AppServices(AppConfig(data_dir=tmp_path_factory.mktemp("video-rounds")), load_backend(clip_model_dir()))
    clips = s.generation.generate(PROMPT, 2, 0, 2, 1.0)
    ids = [c["sample_id"] for c in clips]
    s.judgements.rate(ids[0], "bo", 2)
    s.judgements.rate(ids[1], "bo", 4)
    s.judgements.compare(ids[0], ids[1], "right", "bo", 1.0)
    yield s
    s.close()


def wait(services, timeout: float = 1800) -> dict:
    assert services.worker.wait(timeout), "the round did not end"
    return services.rounds.status()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["ddpo", "truncated-bp", "full-bp"])
def test_a_clip_round_with_each_estimator(services, estimator):
    parent = services.model_versions.active()
    services.rounds.start(RoundConfig.parse({**TINY, "estimator": estimator}))
    status = wait(services)
    assert status["state"] == "finished", status
    assert status["estimator"] == estimator and len(status["history"]) == 1
    version = services.store.get_model_version(status["version_id"])
    assert version["parent_id"] == parent and services.model_versions.active() == status["version_id"]
    after = [services.generation.sample(r["id"]) for r in services.store.db["samples"].rows_where(
        "model_version_id = ?", [status["version_id"]])]
    assert len(after) == 1 and after[0]["frames"] == 8  # the new version's clip (and its pair)


def test_a_stopped_clip_round_changes_nothing(services):
    before = services.model_versions.active()
    n_rounds = len(services.store.training_rounds())
    services.rounds.start(RoundConfig.parse({**TINY, "steps": 200}))
    services.rounds.stop()
    status = wait(services)
    assert status["state"] == "stopped", status
    last = services.store.training_rounds()[n_rounds]
    assert last["state"] == "failed" and "stopped" in last["error"]
    assert services.model_versions.active() == before
    assert not (services.data_dir / "versions" / f"round-{last['id']}").exists()
