"""The reward proxy: gradients, persistence, accuracy against a simulated rater, store training,
and active pair selection."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.reward import clear_test_pairs, learning_curve, make_pool, make_prompts
from feedback_store import FeedbackStore
from rlr_core.feedback.active_selection import DisagreementScorer, SelectionPolicy, pair_disagreement
from rlr_core.feedback.encoders import PerceptionImageEncoder, make_image_encoder
from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder, prompt_encoder_from_config
from rlr_core.feedback.reward_proxy import FitConfig, RewardProxy, fit, load_image_tensor, train_from_store
from rlr_core.shapesworld import perception
from rlr_core.shapesworld import world as sw
from rlr_core.shapesworld.raters import RATERS


@pytest.fixture(scope="module")
def model():
    if not (perception.DEFAULT_PERCEPTION_DIR / "model.safetensors").exists():
        pytest.skip("needs the trained perception model (models/perception)")
    return perception.load()


@pytest.fixture
def untrained_proxy():
    torch.manual_seed(0)
    enc = PerceptionImageEncoder(perception.PerceptionNet())
    return RewardProxy(enc, BagOfWordsPromptEncoder(), n_heads=5)


def test_encoders_rebuild_from_what_a_saved_proxy_records(untrained_proxy):
    image, prompt = untrained_proxy.image_encoder, untrained_proxy.prompt_encoder
    rebuilt = make_image_encoder(image.spec)  # the shipped perception model, not this random one
    assert (rebuilt.name, rebuilt.dim) == (image.name, image.dim)
    assert rebuilt.fingerprint() != image.fingerprint()  # other weights: a saved proxy would refuse them
    assert rebuilt.fingerprint() == make_image_encoder(image.spec).fingerprint()
    words = ["a red circle, blue background", "a small square on the left"]
    assert torch.equal(prompt_encoder_from_config(prompt.config()).encode(words), prompt.encode(words))


def test_prompt_features(untrained_proxy):
    feats = untrained_proxy.prompt_encoder.encode(["a red circle, blue background", "a blue circle, red background",
                                                    "a big violet zebra"])
    assert feats.shape == (3, untrained_proxy.prompt_encoder.dim)
    assert not torch.equal(feats[0], feats[1])  # same words, different bigrams
    assert feats[2].sum() >= 2  # synonyms map (big -> large, violet -> purple); unknown words ignored
    # The encoder's weights are not the proxy's parameters (frozen, and not saved with it).
    assert all(not n.startswith("image_encoder") for n, _ in untrained_proxy.named_parameters())


def test_reward_is_differentiable_in_the_image(untrained_proxy):
    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    prompts = ["a red circle", "a blue square", "a shape", "a large green triangle on the left"]
    r = untrained_proxy(images, prompts)
    assert r.shape == (4,)
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in untrained_proxy.image_encoder.model.parameters())
    assert untrained_proxy.disagreement(images.detach(), prompts).shape == (4,)
    p = untrained_proxy.win_probs(images.detach(), torch.rand(4, 3, 32, 32), prompts)
    assert p.shape == (5, 4) and ((p >= 0) & (p <= 1)).all()
    big = untrained_proxy(torch.rand(2, 3, 64, 64), prompts[:2])  # other sizes are resized
    assert big.shape == (2,)


def test_save_load_round_trip_without_pickle(untrained_proxy, tmp_path):
    x = torch.rand(6, 3, 32, 32)
    prompts = ["a red circle"] * 3 + ["a small blue square"] * 3
    report = fit(untrained_proxy, x, prompts, [(0, 1, 1.0), (1, 2, 0.5), (3, 4, 0.0), (4, 5, 1.0)],
                 [(0, 5), (2, 1)], FitConfig(steps=20))
    folder = untrained_proxy.save(tmp_path / "proxy")
    assert sorted(p.name for p in folder.iterdir()) == ["reward_proxy.json", "reward_proxy.safetensors"]
    meta = json.loads((folder / "reward_proxy.json").read_text())
    assert meta["training"]["n_comparisons"] == 4 == report["n_comparisons"]
    assert set(load_file(folder / "reward_proxy.safetensors")) >= {"w1", "emb_mean", "cut0"}
    loaded = RewardProxy.load(folder, untrained_proxy.image_encoder)
    with torch.no_grad():
        assert torch.allclose(loaded.head_rewards(x, prompts), untrained_proxy.head_rewards(x, prompts))
    other = PerceptionImageEncoder(perception.PerceptionNet())
    with pytest.raises(ValueError, match="weights changed"):
        RewardProxy.load(folder, other)


def test_a_bilinear_proxy_saves_and_loads(untrained_proxy, tmp_path):
    torch.manual_seed(2)
    proxy = RewardProxy(untrained_proxy.image_encoder, untrained_proxy.prompt_encoder, n_heads=3, bilinear_rank=2)
    x, prompts = torch.rand(4, 3, 32, 32), ["a red circle", "a blue square", "a circle", "a square"]
    fit(proxy, x, prompts, [(0, 1, 1.0), (2, 3, 0.0)], [(0, 5)], FitConfig(steps=5))
    loaded = RewardProxy.load(proxy.save(tmp_path / "bilinear"), proxy.image_encoder)
    assert loaded.bilinear_rank == 2
    with torch.no_grad():
        assert torch.allclose(loaded.head_rewards(x, prompts), proxy.head_rewards(x, prompts))


def test_stars_alone_teach_the_ordering(untrained_proxy):
    torch.manual_seed(1)
    x = torch.rand(40, 3, 32, 32)
    brightness = x.mean((1, 2, 3))
    stars = (1 + 4 * (brightness - brightness.min()) / (brightness.max() - brightness.min())).round().long()
    fit(untrained_proxy, x, ["a shape"] * 40, [], list(enumerate(stars.tolist())), FitConfig(steps=200))
    with torch.no_grad():
        r = untrained_proxy(x, ["a shape"] * 40)
    assert torch.corrcoef(torch.stack([r, stars.float()]))[0, 1] > 0.7
    cuts = untrained_proxy.cutpoints()
    assert (cuts[:, 1:] > cuts[:, :-1]).all()


def test_proxy_learns_a_rater_from_200_comparisons(model):
    """Target: >= 85% held-out pairwise accuracy after 200 comparisons. Measured on fresh renders
    against the rater's latent utility, on pairs it clearly distinguishes (see bench.reward);
    over seeds 0-3 this rater gives 0.88-0.94, so 0.85 is a floor, not a tuned threshold."""
    proxy = RewardProxy(PerceptionImageEncoder(model), BagOfWordsPromptEncoder())
    prompts = make_prompts(random.Random(101), 12)
    train, test_pool = make_pool(proxy, prompts, 20, seed=201), make_pool(proxy, prompts, 12, seed=301)
    rater = RATERS["bold"](model, seed=1)
    test = clear_test_pairs(rater, test_pool)
    assert len(test.pairs) > 300
    curve = learning_curve(proxy, rater, train, test, "random", [200], 200, seed=1, fit_cfg=FitConfig())
    assert curve[200] >= 0.85
    assert proxy.training_info["heldout_accuracy"] > 0.6  # its own estimate, on noisy answers
    assert proxy.training_info["n_comparisons"] >= 180  # skips (3%) are left out


def render_store(tmp_path, model, n_prompts: int = 3, per_prompt: int = 6) -> tuple[FeedbackStore, list[int]]:
    rng, nrng = random.Random(0), np.random.default_rng(0)
    store = FeedbackStore(tmp_path / "store")
    ids = []
    for p in make_prompts(rng, n_prompts):
        for _ in range(per_prompt):
            ids.append(store.add_sample(sw.render(p.complete(rng), nrng), sw.caption(p), seed=len(ids)))
    return store, ids


def test_train_from_store_and_active_next_pair(model, tmp_path):
    store, ids = render_store(tmp_path, model)
    rater = RATERS["bold"](model, seed=0)
    rng = random.Random(0)
    for _ in range(30):
        pair = store.next_pair("sim", rng=rng)
        x = torch.stack([torch.from_numpy(np.asarray(store.load_image(i), np.float32) / 255).permute(2, 0, 1)
                         for i in (pair.left_id, pair.right_id)])
        (answer,) = rater.compare(x[:1], x[1:], [pair.prompt])
        store.add_comparison(pair.left_id, pair.right_id, answer, "sim", 2.0)
    for sid in ids[:6]:
        store.add_rating(sid, "sim", 3)
    proxy, report = train_from_store(store, PerceptionImageEncoder(model), cfg=FitConfig(steps=60))
    assert report["n_ratings"] == 6 and 25 <= report["n_comparisons"] <= 30
    assert report["heldout_accuracy"] is not None
    judged = store.preference_records().samples  # the images people judged
    with torch.no_grad():  # the reward's scale over them (normalize_reward divides by it)
        rewards = proxy.head_rewards(load_image_tensor([s["path"] for s in judged.values()]),
                                     [s["prompt"] for s in judged.values()]).mean(0)
    assert report["reward_spread"] == pytest.approx(float(rewards.std()), rel=1e-4) and report["reward_spread"] > 0

    # With no randomness, the scorer makes the store pick the pair the heads disagree on most.
    scorer = DisagreementScorer(proxy, SelectionPolicy(temperature=0, epsilon=0, diversity=0), seed=0)
    pair = store.next_pair("sim", scorer=scorer, rng=rng)
    cands = [c for c in _all_candidates(store, "sim")]
    scores = pair_disagreement(proxy, *_images(store, cands), [c.prompt for c in cands])
    best = cands[int(scores.argmax())]
    assert {pair.left_id, pair.right_id} == {best.left_id, best.right_id}
    store.close()


def _all_candidates(store, rater):
    from feedback_store import queries

    return queries.pair_candidates(store.db, rater, store.images.root, None)


def _images(store, cands):
    from rlr_core.feedback.reward_proxy import load_image_tensor

    return load_image_tensor([c.left_path for c in cands]), load_image_tensor([c.right_path for c in cands])


def test_selection_policy_spreads_over_prompts():
    policy = SelectionPolicy(temperature=0, epsilon=0, diversity=1.0)
    scores = [0.50, 0.45, 0.40, 0.20, 0.19]
    prompts = ["a", "a", "a", "b", "b"]
    picks = policy.select(scores, prompts, 2, np.random.default_rng(0))
    assert [prompts[i] for i in picks] == ["a", "b"]  # a second "a" pair scores 0.45 / e < 0.20
    assert policy.select(scores, prompts, 1, np.random.default_rng(0), recent=Counter({"a": 3})) == [3]
    greedy = SelectionPolicy(temperature=0, epsilon=0, diversity=0).select(scores, prompts, 3,
                                                                          np.random.default_rng(0))
    assert greedy == [0, 1, 2]
