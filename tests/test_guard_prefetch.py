"""The guard's parent and base probes drawn ahead while the app is idle (app/guard_prefetch.py)."""

from __future__ import annotations

import threading
import time

import pytest

from app import fidelity_guard
from app.generation import ACTIVITY
from app.round_config import RoundConfig

TINY = {"steps": 1, "batch_size": 2, "sampling_steps": 4, "samples_per_prompt": 1, "sample_steps": 4, "seed": 0,
        "fidelity_probe_images": 1}


@pytest.fixture()
def services(tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.services import AppServices

    s = AppServices(AppConfig(data_dir=tmp_path / "data"), builtin_backend)
    s.rounds.defaults = {**s.rounds.defaults, **TINY}  # the Train tab's defaults, small enough for a test
    yield s
    s.close()


def rate_some(services, prompt: str = "a blue circle") -> None:
    ids = [x["sample_id"] for x in services.generation.generate(prompt, 2, 0, 4, 3.0)]
    services.judgements.rate(ids[0], "ann", 2)
    services.judgements.compare(ids[0], ids[1], "right", "ann", 1.0)


def test_the_base_probes_are_drawn_while_idle_and_the_first_round_draws_only_its_new_version(services,
                                                                                                monkeypatch):
    prefetch, judge = services.rounds.prefetch, services.fidelity_judge
    assert prefetch.missing()[1] == []  # nothing generated yet: no round could start
    rate_some(services)
    base = services.model_versions.active()
    config, todo = prefetch.missing()
    probes = fidelity_guard.probe_prompts(judge, ["a blue circle"], [], services.rounds.held_out_prompts,
                                          config.fidelity_probe_prompts)
    assert todo == [(base, p) for p in probes]  # the first round's parent is the base: one set
    assert config.fidelity_probe_images == 1 and config.samples.steps == 4

    services.rounds.warm_up().join()  # as python app.py does: the round process, then drawing ahead
    assert prefetch.wait_drawn(timeout=240), prefetch.missing()
    cached = {k.prompt: k for k in fidelity_guard.ProbeCache(services.data_dir).keys(base)}
    assert set(cached) == set(probes)
    assert {(k.per_prompt, k.steps) for k in cached.values()} == {(1, 4)}

    drawn: list[list[str]] = []
    measure = fidelity_guard.measure

    def recording(backend, judge_, prompts, *args, **kwargs):
        if prompts:
            drawn.append(list(prompts))
        return measure(backend, judge_, prompts, *args, **kwargs)

    monkeypatch.setattr(fidelity_guard, "measure", recording)
    services.rounds.start(RoundConfig.parse({}, services.rounds.defaults))
    assert services.worker.wait(300)
    status = services.rounds.status()
    assert status["state"] == "finished", status
    assert drawn == [probes]  # the new version's probes only; the base's came from the cache
    # what was drawn ahead is what the round would have drawn: the base's scores, drawn again here
    again = measure(services.models.backend(base), judge, probes, config.samples, 1)
    read = fidelity_guard.verdict(judge, again, again, again, config.fidelity_threshold, rule=config.fidelity_rule)
    assert status["fidelity_base"] == pytest.approx(read.fidelity_base, abs=1e-4)


def test_drawing_ahead_waits_for_a_draw_someone_waits_on_and_for_a_round(services):
    rate_some(services)
    prefetch = services.rounds.prefetch
    with ACTIVITY.drawing():
        assert not prefetch.idle() and not prefetch.step()
    assert not prefetch.idle()  # just ended: another click is likely
    time.sleep(prefetch.quiet_s)
    assert prefetch.idle()
    release = threading.Event()
    services.worker.submit("a round", lambda ctx: release.wait(30))
    try:
        assert not prefetch.idle() and not prefetch.step()
    finally:
        release.set()
        services.worker.wait(30)
    assert fidelity_guard.ProbeCache(services.data_dir).keys(services.model_versions.active()) == []


def test_it_draws_for_the_settings_the_next_round_uses(services):
    rate_some(services)
    services.state.update(extra={"last_settings": {"fidelity_probe_images": 3, "sample_steps": 5, "seed": 7}})
    assert services.rounds.prefetch.next_config().fidelity_probe_images == 1  # auto-train off: the defaults
    services.rounds.set_auto_train(5)
    config = services.rounds.prefetch.next_config()  # auto-train repeats the last round's settings
    assert (config.fidelity_probe_images, config.samples.steps) == (3, 5)
    services.state.update(extra={"last_settings": {"fidelity_probe_images": "many"}})
    assert services.rounds.prefetch.next_config().fidelity_probe_images == 1  # unreadable: the defaults
    services.rounds.defaults = {**services.rounds.defaults, "fidelity_threshold": 0}
    services.rounds.set_auto_train(0)
    assert services.rounds.prefetch.missing()[1] == []  # the guard is off: nothing to draw
