"""Clips in the store: one lossless animated PNG each with its frames' hash, read back frame for
frame (still frames included), by the reward proxy's loader too; and the videofolder's AVIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feedback_store import FeedbackStore, clips
from feedback_store.validation import ValidationError
from feedback_store.videofolder import encode_avi, read_avi
from rlr_core.feedback.reward_proxy import load_image_tensor


@pytest.fixture()
def store(tmp_path):
    s = FeedbackStore(tmp_path / "data")
    yield s
    s.close()


def moving_square(still: bool = False) -> np.ndarray:
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    frames[..., 2] = 40  # navy-ish background
    for i in range(8):
        x = 10 if still else 4 + 3 * i
        frames[i, 12:20, x:x + 8] = (250, 200, 0)
    return frames


@pytest.mark.parametrize("still", [False, True])
def test_a_clip_is_one_animated_png_with_every_frame(store, still):
    frames = moving_square(still)
    sid = store.add_sample(frames, "a yellow square moving right", seed=3)
    row = store.get_sample(sid)
    assert row["image_path"].endswith(".png") and store.verify() == []
    assert (clips.read_frames(row["image_file"]) == frames).all()  # lossless, 8 frames even when still
    assert row["sampler_settings"]["frames"] == 8
    assert row["sampler_settings"]["frames_sha256"] == clips.frames_sha256(clips.frames_of(frames))
    assert store.load_image(sid).size == (32, 32)  # any PNG reader sees the first frame


def test_a_tensor_clip_and_the_proxy_loader(store):
    clip = torch.rand(8, 3, 32, 32)
    sid = store.add_sample(clip, "a red circle moving up")
    image = store.add_sample(torch.rand(3, 32, 32), "a red circle")
    batch = load_image_tensor([store.get_sample(sid)["image_file"]] * 2)
    assert batch.shape == (2, 8, 3, 32, 32)
    assert torch.allclose(batch[0], (clip * 255).round() / 255, atol=1e-6)
    assert load_image_tensor([store.get_sample(image)["image_file"]]).shape == (1, 3, 32, 32)
    assert "frames" not in store.get_sample(image)["sampler_settings"]


def test_bad_clips_are_refused(store):
    with pytest.raises(ValidationError, match="cannot store"):
        store.add_sample([np.zeros((32, 32, 3)), np.zeros((16, 16, 3))], "a red circle")
    with pytest.raises(ValidationError, match="cannot store"):
        store.add_sample(np.full((8, 32, 32, 3), np.nan), "a red circle")
    assert store.counts()["samples"] == 0


def test_the_frames_hash_sees_pixels_and_shape():
    a = moving_square()
    b = a.copy()
    b[3, 0, 0, 0] += 1
    assert clips.frames_sha256(clips.frames_of(a)) != clips.frames_sha256(clips.frames_of(b))
    assert clips.frames_sha256(clips.frames_of(a[:4])) != clips.frames_sha256(clips.frames_of(a[:4].repeat(2, 0)))


def test_avi_frames_come_back_exactly():
    frames = np.random.default_rng(0).integers(0, 256, (8, 30, 30, 3), dtype=np.uint8)  # rows padded to 4 bytes
    data = encode_avi(frames)
    assert data[:4] == b"RIFF" and data[8:12] == b"AVI " and b"idx1" in data
    assert (read_avi(data) == frames).all()
