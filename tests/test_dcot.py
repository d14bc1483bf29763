import pytest
import torch

from rlr_core import dcot
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import text


def test_split_gives_layout_then_kind_then_everything():
    stages = dcot.split_prompt("a large red circle on the left, black background")
    assert stages.coarse == "a large shape on the left, black background"
    assert stages.mid == "a large circle on the left, black background"
    assert stages.fine == "a large red circle on the left, black background"


def test_split_of_a_sparse_prompt_keeps_every_stage_readable():
    stages = dcot.split_prompt("A blue TRIANGLE")
    assert stages.as_list() == ["a shape", "a triangle", "a blue triangle"]
    for prompt in stages.as_list():
        text.check_prompt(prompt)  # every stage prompt is something the model can read


def test_split_refuses_what_the_model_cannot_read():
    with pytest.raises(text.UnknownWordsError, match="dragon"):
        dcot.split_prompt("a red dragon")
    with pytest.raises(text.PromptError, match="empty"):
        dcot.split_prompt("   ")


def test_edited_stage_prompts_are_checked_by_stage_name():
    ok = dcot.check_stage_prompts(["a shape, navy background", "A circle", "a red circle"])
    assert ok.mid == "a circle"
    with pytest.raises(text.PromptError, match="mid stage prompt: unknown word"):
        dcot.check_stage_prompts(["a shape", "a wobbly circle", "a red circle"])
    with pytest.raises(dcot.StageError, match="need 3"):
        dcot.check_stage_prompts(["a shape", "a circle"])


@pytest.mark.parametrize("steps", [3, 4, 6, 20, 50])
def test_every_stage_gets_steps_in_order(steps):
    stage = dcot.stage_of_steps(steps, (0.3, 0.6))
    assert len(stage) == steps and stage == sorted(stage) and set(stage) == {0, 1, 2}


def test_default_schedule_at_twenty_steps():
    stage = dcot.stage_of_steps(20, (0.3, 0.6))
    assert stage.count(0) == 6 and stage.count(1) == 6 and stage.count(2) == 8
    prompts = dcot.step_prompts(dcot.split_prompt("a red circle"), 20, (0.3, 0.6))
    assert prompts[0] == "a shape" and prompts[6] == "a circle" and prompts[-1] == "a red circle"


@pytest.mark.parametrize("bounds", [(0.5, 0.5), (0.0, 0.5), (0.6, 0.3), (0.2, 1.0)])
def test_bad_boundaries_are_refused(bounds):
    with pytest.raises(dcot.StageError, match="boundaries"):
        dcot.stage_of_steps(20, bounds)


def test_stage_windows_use_the_method_docs_numbering():
    # k = K .. 1: the coarse stage holds the noisiest steps, i.e. the largest k.
    assert dcot.stage_window("coarse", 20, (0.3, 0.6)) == (15, 20)
    assert dcot.stage_window("mid", 20, (0.3, 0.6)) == (9, 14)
    assert dcot.stage_window("fine", 20, (0.3, 0.6)) == (1, 8)
    with pytest.raises(dcot.StageError, match="unknown stage"):
        dcot.stage_window("texture", 20)


def test_staged_sampling_with_one_prompt_matches_plain_sampling(builtin_backend):
    prompt = "a small blue square in the center, white background"
    plain = generate(builtin_backend, [prompt], SamplerSettings(steps=4), seed=7)
    staged, captured = dcot.sample_staged(builtin_backend, [[prompt]] * 4, seed=7, capture_steps=[1, 3])
    assert torch.allclose(plain, staged, atol=1e-5)
    assert set(captured) == {1, 3} and torch.allclose(captured[3], staged, atol=1e-5)


def test_stage_prompts_change_the_image_under_the_same_seed(builtin_backend):
    stages = dcot.split_prompt("a large red circle on the left, black background")
    schedule = dcot.step_prompts(stages, 4)
    plain, _ = dcot.sample_staged(builtin_backend, [[stages.fine]] * 4, seed=3)
    staged, _ = dcot.sample_staged(builtin_backend, [[p] for p in schedule], seed=3)
    assert staged.shape == plain.shape and not torch.equal(staged, plain)
