"""ShapesWorld clips (rendering, captions, vocabulary) and the clip model's motion UNet."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from rlr_core.backends.builtin_clips import BuiltinClipBackend
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import clips, text, video_model
from rlr_core.shapesworld import model as image_model
from rlr_core.shapesworld import world as sw


def foreground_centroids(clip: np.ndarray) -> np.ndarray:
    """(F, 2) centroid (x, y) of the pixels far from the border colour, per frame."""
    out = []
    for frame in clip:
        border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).mean(0)
        mask = np.abs(frame - border).sum(-1) > 0.3
        ys, xs = np.nonzero(mask)
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


@pytest.mark.parametrize("direction", list(clips.DIRECTIONS))
@pytest.mark.parametrize("speed", list(clips.SPEEDS))
def test_clip_moves_as_captioned(direction: str, speed: str) -> None:
    scene = clips.ClipScene("circle", "red", "small", direction, speed, "black")
    clip = clips.render_clip(scene, np.random.default_rng(0))
    assert clip.shape == (clips.NUM_FRAMES, 32, 32, 3) and clip.dtype == np.float32
    steps = np.diff(foreground_centroids(clip), axis=0).mean(0)
    want = np.array(clips.DIRECTIONS[direction]) * clips.SPEEDS[speed]
    assert np.allclose(steps, want, atol=0.25), (steps, want)


def test_clip_keeps_colour_and_size_across_frames() -> None:
    scene = clips.ClipScene("square", "blue", "large", "right", "slow", "white")
    clip = clips.render_clip(scene, np.random.default_rng(1))
    areas = [(np.abs(f - f[0, 0]).sum(-1) > 0.3).sum() for f in clip]
    assert max(areas) - min(areas) <= 0.1 * np.mean(areas)
    centre_colours = [f[int(c[1]), int(c[0])] for f, c in zip(clip, foreground_centroids(clip))]
    assert np.abs(np.array(centre_colours) - centre_colours[0]).max() < 0.06


def test_captions_round_trip_through_the_parser() -> None:
    rng = random.Random(0)
    for _ in range(300):
        scene = clips.PartialClipScene().complete(rng)
        partial = clips.random_partial_clip(rng, scene, 0.3)
        caption = clips.clip_caption(partial)
        assert text.check_prompt(caption, video=True) == caption
        assert clips.parse_clip_caption(caption).specified() == partial.specified()


def test_examples_of_the_grammar() -> None:
    fast_right = clips.ClipScene("circle", "red", "large", "right", "fast", "black")
    assert clips.clip_caption(fast_right) == "a large red circle moving fast to the right, black background"
    still = clips.PartialClipScene(kind="square", direction="still")
    assert clips.clip_caption(still) == "a square standing still"
    assert clips.parse_clip_caption("a blue triangle moving quickly up").specified() == {
        "kind": "triangle", "colour": "blue", "direction": "up", "speed": "fast"}


def test_clip_words_are_refused_for_images_and_unknown_words_for_clips() -> None:
    with pytest.raises(text.UnknownWordsError, match="moving"):
        text.check_prompt("a red circle moving up")
    with pytest.raises(text.UnknownWordsError, match="dancing"):
        text.check_prompt("a red circle dancing", video=True)
    assert text.check_prompt("a red circle moving quickly up", video=True) == "a red circle moving fast up"


def test_clip_vocabulary_extends_the_image_one() -> None:
    image_vocab = text.build_tokenizer().get_vocab()
    clip_vocab = text.build_tokenizer(video=True).get_vocab()
    assert all(clip_vocab[w] == i for w, i in image_vocab.items())
    assert {"moving", "up", "down", "still", "fast", "slowly"} <= set(clip_vocab)


def test_every_clip_scene_once_and_no_held_out_pairs_in_training() -> None:
    scenes = clips.all_clip_scenes()
    assert len(scenes) == len(set(scenes)) == 3 * 6 * 2 * 4 * (4 * 2 + 1)
    stream = clips.training_clips(seed=3)
    assert not any(next(stream)[2].held_out for _ in range(200))


@pytest.fixture(scope="module")
def fresh_clip_model() -> video_model.ClipModel:
    return video_model.from_image_model(image_model.load_model(), seed=0)


def test_motion_modules_start_as_the_image_model(fresh_clip_model: video_model.ClipModel) -> None:
    image = image_model.load_model()
    x = torch.randn(2, clips.NUM_FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 16, image_model.TEXT_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clip_out = fresh_clip_model.denoiser(x, torch.tensor([900, 100]), cond).sample
        frame_out = image.unet(x.flatten(0, 1), torch.tensor([900, 100]).repeat_interleave(clips.NUM_FRAMES),
                               cond.repeat_interleave(clips.NUM_FRAMES, 0)).sample
    assert torch.equal(clip_out.flatten(0, 1), frame_out)


def _perturbed(model: video_model.ClipModel) -> video_model.ClipModel:
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.denoiser.motion_adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_save_load_round_trip_and_seeded_determinism(fresh_clip_model, tmp_path) -> None:
    model = _perturbed(fresh_clip_model)
    model.save(tmp_path / "clips")
    assert video_model.is_clip_model_folder(tmp_path / "clips")
    assert not video_model.is_clip_model_folder(image_model.DEFAULT_MODEL_DIR)
    loaded = BuiltinClipBackend.load(tmp_path / "clips")
    original = BuiltinClipBackend(model)
    model.denoiser.eval()
    settings = SamplerSettings(steps=2, guidance=3.0)
    prompts = ["a red circle moving fast to the right", "a blue square standing still, white background"]
    first = generate(original, prompts, settings, seed=4)
    assert first.shape == (2, clips.NUM_FRAMES, 3, 32, 32)
    assert torch.equal(first, generate(original, prompts, settings, seed=4))
    assert torch.allclose(first, generate(loaded, prompts, settings, seed=4), atol=1e-5)
    assert not torch.allclose(first, generate(original, prompts, settings, seed=5), atol=1e-3)


def test_a_copy_runs_its_own_motion_modules(fresh_clip_model) -> None:
    model = _perturbed(fresh_clip_model)
    twin = copy.deepcopy(model.denoiser)
    x, cond = torch.randn(1, 4, 3, 32, 32), torch.randn(1, 16, image_model.TEXT_DIM)
    with torch.no_grad():
        before = model.denoiser(x, 500, cond).sample
        for p in twin.motion_adapter.parameters():
            p.zero_()
        assert torch.equal(model.denoiser(x, 500, cond).sample, before)
        assert not torch.allclose(twin(x, 500, cond).sample, before)


@pytest.mark.parametrize(("kind", "area"), [("circle", np.pi * 8.5**2), ("square", (2 * 0.85 * 8.5) ** 2),
                                           ("triangle", 1.8 * 8.5**2)])
def test_shape_mask_covers_the_shape_area(kind: str, area: float) -> None:
    mask = sw.shape_mask(kind, 16.0, 16.0, 8.5)
    assert mask.shape == (32, 32, 1) and 0 <= mask.min() and mask.max() <= 1
    assert abs(mask.sum() - area) < 0.05 * area  # drawn on a 4x grid: edges round
