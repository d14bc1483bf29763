"""Perception for clips: the shipped model reads motion from fresh renders, is differentiable in
the frames, round-trips through safetensors, serves as the video reward proxy's encoder, and
judges the clip rewards."""

import numpy as np
import pytest
import torch

from rlr_core import rewards
from rlr_core.feedback import encoders, reward_proxy
from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
from rlr_core.feedback.reward_proxy import RewardProxy
from rlr_core.shapesworld import clip_perception as cp
from rlr_core.shapesworld import clips, perception


@pytest.fixture(scope="module")
def judge() -> cp.ClipPerceptionNet:
    return cp.load()


def clip_of(**kw) -> torch.Tensor:
    base = dict(kind="circle", colour="red", size="large", direction="right", speed="fast", background="black")
    scene = clips.ClipScene(**{**base, **kw})
    return cp.render_clips([scene], np.random.default_rng(7))


def test_shipped_model_reads_motion_from_fresh_renders(judge):
    # Another seed than the card's, so this is a second look at unseen renders.
    acc = cp.accuracy(judge, n=240, seed=777, batch=120)
    assert acc["direction"] >= 0.99 and acc["speed"] >= 0.99, acc
    for name in cp.IMAGE_ATTRIBUTES:
        assert acc[name] >= 0.97, acc


def test_still_clips_have_no_speed_and_predict_reads_every_attribute(judge):
    pred = judge.predict(torch.cat([clip_of(direction="still", speed="slow"), clip_of(direction="up")]))
    assert pred[0]["direction"] == "still" and pred[0]["speed"] == "slow"
    assert pred[1] == {"kind": "circle", "colour": "red", "size": "large", "direction": "up", "speed": "fast",
                       "background": "black"}


def test_gradient_reaches_the_frames(judge):
    frames = clip_of().requires_grad_(True)
    encoder = cp.ClipPerceptionEncoder(judge)
    emb = encoder.embed(frames)
    assert emb.shape == (1, cp.EMBED_DIM) == (1, encoder.dim)
    grad_emb, = torch.autograd.grad(emb.square().sum(), frames)
    reward = rewards.make_reward("prefer-fast", judge)(frames, ["a red circle"])
    grad_reward, = torch.autograd.grad(reward.sum(), frames)
    for grad in (grad_emb, grad_reward):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        # the motion part sees every frame, not only the first
        assert (grad.abs().flatten(2).sum(-1) > 0).all()


def test_save_load_round_trip(judge, tmp_path):
    perception.save(judge, tmp_path / "cp", {"num_frames": clips.NUM_FRAMES})
    again = cp.load(tmp_path / "cp")
    frames = torch.cat([clip_of(), clip_of(direction="left", colour="blue")])
    with torch.no_grad():
        assert torch.equal(judge.embed(frames), again.embed(frames))
    assert cp.ClipPerceptionEncoder(judge).fingerprint() == cp.ClipPerceptionEncoder(again).fingerprint()
    with pytest.raises(FileNotFoundError):
        cp.load(tmp_path / "nothing")


def test_training_cli_writes_a_loadable_model(tmp_path):
    cp.main(["--steps", "2", "--batch", "4", "--pool", "8", "--eval-clips", "4", "--out", str(tmp_path / "m")])
    model = cp.load(tmp_path / "m")
    assert set(model(clip_of())) == set(clips.CLIP_ATTRIBUTES)
    assert (tmp_path / "m" / "card.json").read_text().count("accuracy_fresh_renders") == 1


def test_symmetries_move_the_direction_label_with_the_clip():
    names = clips.CLIP_ATTRIBUTES["direction"]
    frames = torch.cat([clip_of(direction=d) for d in names])
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        moved, labels = cp.symmetry(frames, torch.arange(len(names)), gen)
        for clip, label in zip(moved, labels.tolist()):
            # the shape's centre of mass (red channel on black) moves the way the label says
            mass = (clip[:, 0] - 0.3).clamp(min=0)
            ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
            cx, cy = [(mass * g).sum((-1, -2)) / mass.sum((-1, -2)) for g in (xs, ys)]
            dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
            want = clips.DIRECTIONS[names[label]]
            assert dx == pytest.approx(want[0] * 15.75, abs=2) and dy == pytest.approx(want[1] * 15.75, abs=2)


def test_video_backend_gets_the_clip_encoder_and_proxies_reload(judge, tmp_path):
    class VideoBackend:  # what make_image_encoder asks of a backend: is it a video one
        is_video = True

    enc = encoders.make_image_encoder("perception", VideoBackend())
    assert isinstance(enc, cp.ClipPerceptionEncoder) and enc.spec == "clip-perception"
    assert isinstance(encoders.make_image_encoder("clip-perception"), cp.ClipPerceptionEncoder)
    proxy = RewardProxy(cp.ClipPerceptionEncoder(judge), BagOfWordsPromptEncoder(), n_heads=2)
    frames = torch.cat([clip_of(), clip_of(direction="down")])
    proxy.set_normalizer(proxy.image_encoder.embed(frames))
    proxy.save(tmp_path / "proxy")
    assert reward_proxy.saved_encoder_spec(tmp_path / "proxy") == "clip-perception"
    again = reward_proxy.load_proxy(tmp_path / "proxy")
    prompts = ["a red circle moving right", "a red circle moving down"]
    with torch.no_grad():
        assert torch.allclose(proxy(frames, prompts), again(frames, prompts))


# ----------------------------------------------------------------------------- clip rewards
def test_clip_rewards_prefer_what_they_name(judge):
    fast, slow = clip_of(speed="fast"), clip_of(speed="slow")
    still, left, blue = clip_of(direction="still", speed="slow"), clip_of(direction="left"), clip_of(colour="blue")
    prompts = ["a circle"]

    def r(spec: str, frames: torch.Tensor, prompts=prompts) -> float:
        with torch.no_grad():
            return float(rewards.make_reward(spec, judge)(frames, prompts))

    assert r("prefer-fast", fast) > r("prefer-fast", slow) and r("prefer-fast", fast) > r("prefer-fast", still)
    assert r("prefer-slow", slow) > r("prefer-slow", fast) and r("prefer-slow", slow) > r("prefer-slow", still)
    assert r("prefer-speed:fast", fast) == pytest.approx(r("prefer-fast", fast))
    assert r("prefer-still", still) > r("prefer-still", fast)
    assert r("prefer-direction:left", left) > r("prefer-direction:left", fast)
    assert r("prefer-colour:red", fast) > r("prefer-colour:red", blue)
    assert r("prefer-color:blue", blue) > r("prefer-color:blue", fast)
    right = "a large red circle moving fast to the right, black background"
    wrong = "a small blue square moving slowly to the left, white background"
    assert r("fidelity", fast, [right]) > r("fidelity", fast, [wrong]) + 10
    assert r("fidelity+prefer-fast", fast, [right]) == pytest.approx(r("fidelity", fast, [right])
                                                                     + r("prefer-fast", fast, [right]), abs=1e-4)


def test_clip_reward_names_and_targets(judge):
    assert rewards.targeted_attributes(rewards.make_reward("prefer-fast", judge)) == {"speed", "direction"}
    assert rewards.targeted_attributes(rewards.make_reward("prefer-colour:red", judge)) == {"colour"}
    assert rewards.targeted_attributes(rewards.make_reward("fidelity", judge)) == set()
    for bad in ("prefer-direction:sideways", "prefer-position:left", "prefer-large", "nonsense"):
        with pytest.raises(ValueError):
            rewards.make_reward(bad, judge)
    # the image registry is untouched: prefer-fast is not an image reward
    with pytest.raises(ValueError):
        rewards.make_reward("prefer-fast", rewards.load_perception())


def test_clip_fidelity_accuracy(judge):
    frames = torch.cat([clip_of(), clip_of(direction="still", speed="slow")])
    prompts = ["a large red circle moving fast to the right", "a red circle standing still, white background"]
    acc = rewards.fidelity_accuracy(judge, frames, prompts)
    assert acc.tolist() == pytest.approx([1.0, 3 / 4])
    assert rewards.fidelity_accuracy(judge, frames, prompts, ignore={"background"}).tolist() == [1.0, 1.0]
