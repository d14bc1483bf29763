"""The video benchmarks end to end at a tiny size, on a stand-in clip model (the image model with
fresh motion modules, in the shipped format): fidelity per attribute with its targets, and an
alignment round of RLR and truncated BP on a clip reward."""

import json
from collections import Counter

import pytest
import torch

from bench import video_alignment, video_fidelity
from rlr_core.shapesworld import clip_perception, clips, perception, video_model
from rlr_core.shapesworld import model as image_model


@pytest.fixture(scope="module")
def clip_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-model")
    video_model.from_image_model(image_model.load_model()).save(folder)
    return folder


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A clip judge for the machinery (the shipped image perception, an untrained motion head):
    the benchmarks' plumbing is under test here, not the judge's accuracy."""
    folder = tmp_path_factory.mktemp("clip-judge")
    torch.manual_seed(0)
    perception.save(clip_perception.ClipPerceptionNet(perception.load()), folder, {"num_frames": clips.NUM_FRAMES})
    return folder


def test_benchmark_captions_are_balanced_and_include_held_out_pairs():
    scenes = video_fidelity.benchmark_scenes(256)
    assert len(set(scenes)) > 200
    for name, values in clips.CLIP_ATTRIBUTES.items():
        counts = Counter(getattr(s, name) for s in scenes if name != "speed" or s.moving)
        assert set(counts) == set(values), name
        assert max(counts.values()) - min(counts.values()) <= 1 or name in ("kind", "colour"), (name, counts)
    assert sum(s.held_out for s in scenes) == 64
    assert all(s.speed == "slow" for s in scenes if not s.moving)
    assert video_fidelity.benchmark_scenes(256) == scenes  # a fixed set


def test_video_fidelity_at_a_tiny_size(clip_model_dir, judge_dir, tmp_path):
    out = tmp_path / "vf.json"
    video_fidelity.main(["--model", str(clip_model_dir), "--prompts", "4", "--steps", "2", "--batch", "4",
                         "--speed-repeats", "1", "--guidance", "1.0", "--judge", str(judge_dir), "--json", str(out)])
    result = json.loads(out.read_text())
    for group in ("all", "held_out"):
        assert set(result["accuracy"][group]) == set(clips.CLIP_ATTRIBUTES)
    measured = [v for v in result["accuracy"]["all"].values() if v is not None]  # None: no prompt named it
    assert measured and all(0 <= v <= 1 for v in measured)
    assert result["settings"]["held_out_prompts"] == 1 and result["settings"]["frames"] == clips.NUM_FRAMES
    assert result["seconds_per_4_clips"] > 0
    checks = {t["check"].split(" ")[0]: t for t in result["targets"]}
    assert set(checks) == {"direction", "speed", "kind", "colour", "background", "seconds_per_4_clips"}
    assert all(isinstance(t["met"], bool) for t in result["targets"])


def test_video_alignment_at_a_tiny_size(clip_model_dir, judge_dir, tmp_path):
    out = tmp_path / "va.json"
    result = video_alignment.main([
        "--model", str(clip_model_dir), "--methods", "rlr", "truncated-bp", "--seeds", "1", "--rounds", "1",
        "--batch", "2", "--steps", "2", "--guidance", "1.0", "--eval-every", "1", "--judge", str(judge_dir),
        "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["curves"]) == {"rlr", "truncated-bp"}
    for runs in saved["curves"].values():
        assert [pt["samples"] for pt in runs[0]] == [0, 2]
        assert all(pt["eval_fidelity"] is not None for pt in runs[0])
    assert result["targets"][0]["check"] == "rlr: eval reward rises over the round"
    assert saved["settings"]["reward"] == "prefer-fast" and saved["settings"]["video"] is True
