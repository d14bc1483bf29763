"""The alignment benchmark's bookkeeping: hacking-aware fidelity, its issue checks, and its cache
(resume, partial runs, --from-cache), with one tiny real run on the built-in model."""

import json

import numpy as np
import pytest
import torch

from bench import alignment
from rlr_core import rewards
from rlr_core.shapesworld import perception
from rlr_core.shapesworld import world as sw


def test_targeted_attributes_names_what_a_reward_asks_for_regardless_of_prompt():
    judge = perception.load()

    def targets(spec: str) -> set[str]:
        return rewards.targeted_attributes(rewards.make_reward(spec, judge))

    assert targets("fidelity") == set()
    assert targets("prefer-colour:red") == {"colour"}
    assert targets("prefer-color:red") == {"colour"}
    assert targets("prefer-large+fidelity") == {"size"}


def test_fidelity_can_leave_out_the_rewarded_attribute():
    judge = perception.load()
    scene = sw.Scene(kind="circle", colour="red", size="large", position="left", background="black")
    image = torch.from_numpy(sw.render(scene, np.random.default_rng(0))).permute(2, 0, 1)[None]
    prompt = ["a large blue circle on the left"]  # colour wrong, kind, size and position right
    assert float(rewards.fidelity_accuracy(judge, image, prompt)) == pytest.approx(3 / 4)
    assert float(rewards.fidelity_accuracy(judge, image, prompt, ignore={"colour"})) == 1.0


def curve(rewards_: list[float], fidelity: list[float] | None = None, batch: int = 8) -> list[dict]:
    fidelity = fidelity or [0.9] * len(rewards_)
    return [{"step": i, "samples": i * batch, "train_seconds": float(i), "train_reward": r,
             "eval_reward": r, "eval_fidelity": f} for i, (r, f) in enumerate(zip(rewards_, fidelity))]


def checks_by_name(curves) -> dict[str, bool]:
    return {c["check"].split(" (")[0]: c["met"] for c in alignment.issue_targets(curves)}


def test_issue_checks_pass_and_fail_on_the_right_curves():
    ddpo = [curve([-10, -9, -8, -7, -6, -5, -4, -3, -2])] * 2  # DDPO ends at -2 after 64 samples
    fast = [curve([-10, -2, -1, -1, -1, -1, -1, -1, -1])] * 2  # reaches -2 after 8 samples (1/8)
    slow = [curve([-10, -9, -8, -6, -4, -3, -2, -2, -2])] * 2  # after 48 samples (3/4)
    collapse = [curve([-10, -1, -0.5, -4, -6, -6, -6, -6, -6], [0.9, 0.9, 0.8, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4])] * 2
    got = checks_by_name({"rlr": fast, "ddpo": ddpo, "truncated-bp": collapse})
    assert got["rlr reaches DDPO's final eval reward"] is True
    assert got["rlr eval reward >= truncated BP's at 64 samples"] is True
    assert got["truncated-bp: no collapse"] is False
    assert got["truncated-bp: fidelity holds"] is False
    assert got["rlr: no collapse"] is True and got["rlr: fidelity holds"] is True
    got = checks_by_name({"rlr": slow, "ddpo": ddpo})
    assert got["rlr reaches DDPO's final eval reward"] is False


def test_summary_compares_methods_at_a_common_sample_count():
    rows = alignment.summarise({"a": [curve([-10, -5, -1])], "b": [curve([-10, -8])]})
    assert rows[0]["eval reward @8"].startswith("-5.000") and rows[1]["eval reward @8"].startswith("-8.000")


def test_quick_run_caches_every_point_and_summarises_from_cache(tmp_path):
    out, cache = tmp_path / "a.json", tmp_path / "cache"
    args = ["--quick", "--methods", "rlr", "--seeds", "1", "--reward", "prefer-colour:red", "--cache", str(cache)]
    alignment.main(args + ["--json", str(out)])
    saved = json.loads((cache / "rlr-seed0.json").read_text())
    assert saved["complete"] and len(saved["curve"]) == 3  # start + 2 steps (--quick evaluates every step)
    first = json.loads(out.read_text())
    assert first["partial_runs"] == 0 and first["curves"]["rlr"][0] == saved["curve"]
    # an interrupted run: --from-cache reports it as it stands and counts it; a plain rerun trains it again
    saved["complete"], saved["curve"] = False, saved["curve"][:2]
    (cache / "rlr-seed0.json").write_text(json.dumps(saved))
    alignment.main(args + ["--from-cache", "--json", str(out)])
    assert json.loads(out.read_text())["partial_runs"] == 1
    alignment.main(args + ["--json", str(out)])
    again = json.loads(out.read_text())

    def untimed(run: list[dict]) -> list[dict]:
        return [{k: v for k, v in pt.items() if k != "train_seconds"} for pt in run]

    assert again["partial_runs"] == 0 and untimed(again["curves"]["rlr"][0]) == untimed(first["curves"]["rlr"][0])


def test_estimator_benchmark_cache_refuses_draws_of_another_setting(tmp_path):
    """A cache of gradient draws is reused only for the exact setting that made it (a changed
    default once relabelled cached rows silently)."""
    from bench import estimators as bench_est
    from rlr_core.estimators import make_estimator
    from rlr_core.estimators.backend_chain import BackendChain
    from rlr_core.sampler import SamplerSettings
    from rlr_core.training import lora

    backend = bench_est.load_backend(bench_est.DEFAULT_MODEL_DIR, "cpu")
    lora.add_lora(backend, rank=4, seed=0)
    chain = BackendChain(backend, rewards.make_reward("prefer-colour:red"), SamplerSettings(3, 1.0, 1.0))
    path = tmp_path / "row.safetensors"
    first = bench_est.draw(chain, make_estimator("rlr", block=1, tail=1), 1, 1, seed=0, desc="a", cache=path,
                           reward="prefer-colour:red")
    again = bench_est.draw(chain, make_estimator("rlr", block=1, tail=1), 1, 1, seed=0, desc="a", cache=path,
                           reward="prefer-colour:red")
    assert torch.equal(first.grads, again.grads) and again.seconds == first.seconds  # reused, not redrawn
    with pytest.raises(ValueError, match="drawn with another setting"):
        bench_est.draw(chain, make_estimator("rlr", block=1, tail=2), 1, 1, seed=0, desc="a", cache=path,
                       reward="prefer-colour:red")
