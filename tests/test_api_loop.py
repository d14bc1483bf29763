"""The full loop through gradio_client, with a simulated rater in the person's place: after two
short rounds with the app's default estimator, fresh samples (fixed seeds) score higher with
that rater than before.

Runs ``examples/api_loop.py`` (the documented example) against the app started in-process.
About 5 minutes on two busy CPU cores.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "api_loop.py"
# The rounds use the app's default estimator on the built-in model (the loop benchmark's pick)
# and settings (6 optimiser steps each), as bench/safeguards.py does; this test is that
# benchmark's first two rounds at seed 0. MIN_GAIN, on a utility in
# [0, 1] (the base model scores 0.167 with this rater on these fixed seeds): the two-round gain
# measured by `python -m bench.safeguards` (bench/results/safeguards.json, "two_round_gain") was
# 0.323, 0.277 and 0.125 (seeds 1-3): mean 0.242, seed-to-seed sd 0.104. The test requires
# mean - 2 sd (0.03, rounded down): a loop that does not learn fails it; a run like the
# measured ones passes it unless it falls 2 sd short. (With RLR the same gains were 0.296,
# 0.223 and 0.199: bench/results/safeguards_rlr.json.)
MIN_GAIN = 0.03


def load_example():
    spec = importlib.util.spec_from_file_location("api_loop_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_simulated_rater_preference_rises_after_rounds(tmp_path, builtin_backend):
    from app.config import AppConfig
    from app.round_config import defaults_for
    from app.server import serve
    from rlr_core.shapesworld import raters as simulated_raters
    from rlr_core.shapesworld.perception import DEFAULT_PERCEPTION_DIR, load

    if not (DEFAULT_PERCEPTION_DIR / "model.safetensors").exists():
        pytest.skip("the simulated rater needs the perception model in models/perception")
    from bench.safeguards import LOOP, default_round

    example = load_example()
    rater = simulated_raters.bold_taste(load(), seed=0)
    settings = default_round()
    assert settings["estimator"] == defaults_for(builtin_backend)["estimator"] != "full-bp"
    lines: list[str] = []
    with serve(AppConfig(data_dir=tmp_path, port=0), builtin_backend) as app:
        client = gradio_client.Client(app.url, verbose=False)
        counts = []  # measuring runs in preview mode: it must store nothing
        scores = example.run_loop(client, rater, rounds=2, steps=LOOP["steps"],
                                  samples_per_prompt=LOOP["samples_per_prompt"], comparisons=LOOP["comparisons"],
                                  round_settings=settings, judge_after=LOOP["judge_after"],
                                  use_guard=LOOP["use_guard"], log=lines.append,
                                  on_score=lambda r, each: counts.append(client.predict(api_name="/counts")))
        versions = client.predict(api_name="/versions")
        rounds = app.services.store.training_rounds()
    print("\n".join(lines))
    assert [r["state"] for r in rounds] == ["finished", "finished"]
    name = f"({settings['estimator']})"
    assert [v["name"] for v in versions] == ["v0 (base)", f"v1 {name}", f"v2 {name}"]
    assert all(v["comparisons_vs_parent"] > 0 for v in versions[1:])  # before/after pairs were judged
    assert counts[0]["samples"] == 0  # the first measurement, before anything was generated, stored nothing
    assert scores[-1] > scores[0] + MIN_GAIN, f"preference scores {scores}"
