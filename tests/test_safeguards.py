"""Rounds must not make the model worse silently: preview generation, replayable seeds, flagged
versions with rollback, auto-train from the best-judged version, and the over-optimisation guard
(uncertainty-penalised reward, early stop). Real SQLite, the real built-in model, the app over
its API where the API is what is checked; the smallest settings that run the real path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from app.errors import AppError
from app.plateau import Plateau
from app.round_config import RoundConfig
from app.safeguards import judge, p_not_worse, wilson_upper
from rlr_core.training.lora import LORA_WEIGHTS

gradio_client = pytest.importorskip("gradio_client")
TINY = {"steps": 2, "batch_size": 2, "sampling_steps": 4, "samples_per_prompt": 4, "sample_steps": 4, "seed": 5}


def stats(*rows):
    """version_stats rows: (id, parent, wins, losses, ties)."""
    return [{"version_id": i, "parent_id": p, "wins_vs_parent": w, "losses_vs_parent": lo, "ties_vs_parent": t}
            for i, p, w, lo, t in rows]


# ------------------------------------------------------------------ the rules
def test_only_a_confident_loss_is_flagged():
    assert p_not_worse(6, 15) == pytest.approx(82160 / 2**21)  # 0.039: flagged
    assert p_not_worse(10, 13) > 0.3 and p_not_worse(0, 3) == 1 / 8  # not evidence yet
    assert p_not_worse(0, 5) == 1 / 32 and p_not_worse(0, 0) is None
    assert wilson_upper(6, 21) == pytest.approx(0.4647, abs=1e-3) and wilson_upper(0, 0) is None
    j = judge(stats((1, None, 0, 0, 0), (2, 1, 0, 3, 0), (3, 1, 0, 5, 9)))
    assert [j[v]["flagged"] for v in (1, 2, 3)] == [False, False, True]  # ties neither help nor hurt
    # the example: 23-4, 13-10, 6-15
    j = judge(stats((1, None, 0, 0, 0), (2, 1, 23, 4, 0), (3, 2, 13, 10, 0), (4, 3, 6, 15, 0)))
    assert [j[v]["flagged"] for v in (1, 2, 3, 4)] == [False, False, False, True]
    assert [v for v in j if j[v]["best_judged"]] == [3]  # not the last (4): auto-train builds on 3


def test_best_judged_skips_flagged_lineages_and_prefers_the_newest_on_a_tie():
    # 2 beat the base, 3 lost to 2 (flagged), 4 is 3's unjudged child: its lineage is flagged
    j = judge(stats((1, None, 0, 0, 0), (2, 1, 8, 2, 0), (3, 2, 2, 14, 0), (4, 3, 0, 0, 0), (5, 1, 5, 5, 0)))
    assert j[4]["lineage_flagged"] and not j[4]["flagged"]
    assert [v for v in j if j[v]["best_judged"]] == [2]
    unjudged = judge(stats((1, None, 0, 0, 0), (2, 1, 0, 0, 0), (3, 2, 0, 0, 0)))
    assert [v for v in unjudged if unjudged[v]["best_judged"]] == [3]  # nothing judged: the newest


def test_plateau_stops_after_patience_steps_without_a_new_best():
    p = Plateau(patience=3)
    stops = [p.update(i + 1, r) for i, r in enumerate([0.0, 1.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.0])]
    # averages 0, .3, .81, .867 (best, step 4), .757, .59, .443: three steps without a new best
    assert stops.index(True) == 6 and p.best_step == 4 and p.stopped_at == 7
    off = Plateau(patience=0)
    assert not any(off.update(i, -i) for i in range(50))


def test_round_settings_validate_the_penalty_and_patience():
    c = RoundConfig.parse({})
    assert (c.uncertainty_penalty, c.patience) == (1.0, 8)
    assert RoundConfig.parse(c.public()) == c
    for bad, match in [({"uncertainty_penalty": -1}, "uncertainty penalty"), ({"uncertainty_penalty": "x"},
                       "uncertainty penalty"), ({"patience": 1.5}, "patience"), ({"patience": -2}, "patience")]:
        with pytest.raises(AppError, match=match):
            RoundConfig.parse(bad)


def test_penalised_reward_is_mean_minus_lambda_spread():
    from app.training_job import ProxyReward
    from rlr_core.feedback.encoders import PerceptionImageEncoder
    from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
    from rlr_core.feedback.reward_proxy import RewardProxy

    torch.manual_seed(0)
    proxy = RewardProxy(PerceptionImageEncoder(), BagOfWordsPromptEncoder())
    x, prompts = torch.rand(3, 3, 32, 32), ["a red circle"] * 3
    heads = proxy.head_rewards(x, prompts).detach()
    got = ProxyReward(proxy, penalty=2.0)(x, prompts).detach()
    assert torch.allclose(got, heads.mean(0) - 2.0 * heads.std(0), atol=1e-6)
    assert not torch.allclose(got, heads.mean(0))


def test_a_normalised_reward_is_the_penalised_reward_over_the_scale_and_reads_back_raw():
    """(r - lambda * spread) / s + w * fidelity; the Train tab's plot gets mean(r) back."""
    from app.training_job import ProxyReward
    from rlr_core.feedback.encoders import PerceptionImageEncoder
    from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
    from rlr_core.feedback.reward_proxy import RewardProxy

    class Judge:  # a known fidelity per image, so the sum can be checked term by term
        def score(self, images, prompts):
            return images.mean((1, 2, 3))

    torch.manual_seed(0)
    proxy = RewardProxy(PerceptionImageEncoder(), BagOfWordsPromptEncoder())
    x, prompts = torch.rand(3, 3, 32, 32), ["a red circle"] * 3
    heads = proxy.head_rewards(x, prompts).detach()
    reward = ProxyReward(proxy, penalty=2.0, judge=Judge(), fidelity_weight=0.5, scale=4.0)
    got = reward(x, prompts).detach()
    want = (heads.mean(0) - 2.0 * heads.std(0)) / 4.0 + 0.5 * x.mean((1, 2, 3))
    assert torch.allclose(got, want, atol=1e-6)
    assert reward.proxy_reward(float(got.mean()), reward.observe()) == pytest.approx(float(heads.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="positive"):
        ProxyReward(proxy, scale=0.0)


def test_the_reward_is_divided_by_the_proxys_spread_only_when_asked():
    from app.rounds import reward_scale

    assert reward_scale(RoundConfig.parse({"normalize_reward": True}), 3.5) == 3.5
    assert reward_scale(RoundConfig.parse({"normalize_reward": True}), 0.0) == 1.0  # one judged image: no spread
    assert reward_scale(RoundConfig.parse({}), 3.5) == 1.0
    assert RoundConfig.parse({"normalize_reward": 1}).normalize_reward is True
    for bad in ("yes", 2, [True]):
        with pytest.raises(AppError, match="normalize reward must be true or false"):
            RoundConfig.parse({"normalize_reward": bad})


# ------------------------------------------------------------------ through the app
@pytest.fixture(scope="module")
def client(running_app):
    return gradio_client.Client(running_app.url, verbose=False)


def call(client, endpoint: str, *args):
    return client.predict(*args, api_name=f"/{endpoint}")


def wait_round(client, services) -> dict:
    assert services.worker.wait(300), "the round did not end"
    return call(client, "train_status")


def judged(client, rater: str = "ann") -> list[dict]:
    samples = call(client, "generate", "a blue circle", 3, 0, 3, 3.0)
    for s, stars in zip(samples, [1, 3, 5]):
        call(client, "rate", s["sample_id"], stars, rater)
    return samples


def test_preview_generation_stores_nothing_and_takes_a_version(client, running_app):
    store = running_app.services.store
    judged(client)
    before = store.counts()
    ids = lambda rows: sorted(r["sample_id"] for r in rows)
    queue = ids(call(client, "samples_to_rate", "bob", 64))
    preview = call(client, "generate", "a red square", 2, 3, 3, 3.0, None, True)
    assert [p["sample_id"] for p in preview] == [None, None] and all(p["preview"] for p in preview)
    base = call(client, "versions")[0]["version_id"]
    assert call(client, "generate", "a red square", 1, 3, 3, 3.0, base, True)[0]["version_id"] == base
    for args, match in [((10**6, True), "no model version 1000000"), (("latest", True), "version"),
                        ((None, "yes"), "preview must be true or false")]:
        with pytest.raises(gradio_client.exceptions.AppError, match=match):
            call(client, "generate", "a red square", 1, 3, 3, 3.0, *args)
    assert store.counts() == before  # no sample, so nothing for the rating or pair queues or a round
    assert ids(call(client, "samples_to_rate", "bob", 64)) == queue
    stored = call(client, "generate", "a red square", 2, 3, 3, 3.0)  # the same draw, stored this time
    assert [p["image_png_b64"] for p in preview] == [s["image_png_b64"] for s in stored]


def test_a_round_reports_its_seed_and_replays_to_the_same_adapter(client, running_app):
    services = running_app.services
    if services.store.counts()["ratings"] == 0:
        judged(client)
    call(client, "train_start", {**TINY, "seed": None})
    first = wait_round(client, services)
    assert first["state"] == "finished", first
    assert isinstance(first["seed"], int)
    assert all("penalised" in row and row["penalised"] <= row["reward"] + 1e-9 for row in first["history"])
    v1 = [v for v in call(client, "versions") if v["version_id"] == first["version_id"]][0]
    assert (v1["seed"], v1["round_id"]) == (first["seed"], first["round_id"])
    call(client, "rollback", "", v1["parent_id"])  # replay from the same parent with the reported seed
    call(client, "train_start", {**TINY, "seed": first["seed"]})
    second = wait_round(client, services)
    assert second["state"] == "finished" and second["seed"] == first["seed"]
    weights = [load_file(services.models.weights_path(s["version_id"]) / LORA_WEIGHTS)
               for s in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_version_that_loses_to_its_parent_is_flagged_rolled_back_and_not_built_on(client, running_app):
    services = running_app.services
    call(client, "rollback", "", call(client, "versions")[0]["version_id"])  # from the base
    call(client, "train_start", TINY)
    good = wait_round(client, services)["version_id"]
    call(client, "train_start", TINY)
    bad = wait_round(client, services)["version_id"]
    pairs = services.store.db.query(
        "SELECT n.id AS new, max(p.id) AS old FROM samples n JOIN samples p ON p.prompt_id = n.prompt_id "
        "AND p.seed = n.seed AND json_extract(p.sampler_settings, '$.batch_index') = "
        "json_extract(n.sampler_settings, '$.batch_index') WHERE n.model_version_id = ? AND p.model_version_id = ? "
        "GROUP BY n.id", [bad, good])
    pairs = list(pairs)
    assert len(pairs) >= 4  # samples_per_prompt per prompt the round trained on
    for rater in ("r1", "r2", "r3", "r4"):  # blind answers: the parent wins every one
        for p in pairs:
            services.judgements.compare(p["new"], p["old"], "right", rater, 1.0)
    rows = {v["version_id"]: v for v in call(client, "versions")}
    assert rows[bad]["flagged"] and rows[bad]["active"] and rows[bad]["win_rate_upper"] < 0.5
    assert not rows[good]["flagged"] and rows[good]["best_judged"]
    # auto-train continues from the best-judged version, not the active (flagged) one
    call(client, "set_auto_train", 1)
    services.judgements.compare(pairs[0]["new"], pairs[0]["old"], "right", "r5", 1.0)
    status = wait_round(client, services)
    assert status["state"] == "finished", status
    assert services.store.get_training_round(status["round_id"])["base_version_id"] == good
    call(client, "set_auto_train", 0)
    assert call(client, "rollback", "", good)["id"] == good  # one click back to the chosen version
    assert [v for v in call(client, "versions") if v["active"]][0]["version_id"] == good


def test_a_round_stops_early_when_the_penalised_reward_stops_rising(client, running_app):
    services = running_app.services
    call(client, "train_start", {**TINY, "steps": 40, "patience": 1, "samples_per_prompt": 1})
    status = wait_round(client, services)
    assert status["state"] == "finished", status
    stopped = status["plateau_stopped_at"]
    assert stopped is not None and stopped < 40 and len(status["history"]) == stopped
    assert services.store.get_model_version(status["version_id"])["metrics"]["plateau_stopped_at"] == stopped


def test_rollback_to_a_chosen_version_is_admin_only_on_a_public_app(public_app):
    c = gradio_client.Client(public_app.url, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match="admin password"):
        call(c, "rollback", "wrong", 1)
