"""The clip model's moving frame of reference: whole-pixel frame shifts, the trajectory head, and
the clip model and its pretraining built on them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlr_core.backends.builtin_clips import BuiltinClipBackend
from rlr_core.shapesworld import clips, video_model
from rlr_core.shapesworld import model as image_model
from rlr_core.shapesworld.trajectory import TrajectoryHead, frame_offsets, shift_frames, whole_pixel_offsets


def test_shift_moves_content_by_the_rounded_offset_and_wraps():
    frames = torch.zeros(3, 1, 8, 8)
    frames[:, 0, 2, 3] = 1.0  # a dot at x=3, y=2
    out = shift_frames(frames, torch.tensor([[1.0, 0.0], [-2.4, 1.5], [6.0, -3.0]]))
    # 1.5 rounds up to 2, -2.4 to -2; 3 + 6 wraps to 1.
    assert [tuple(torch.nonzero(o[0]).tolist()[0]) for o in out] == [(2, 4), (4, 1), (7, 1)]
    assert torch.equal(shift_frames(out, -torch.tensor([[1.0, 0.0], [-2.0, 2.0], [6.0, -3.0]])), frames)


def test_shift_keeps_white_noise_white():
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shifted = shift_frames(noise, torch.full((64, 2), 2.25))
    # Each image's values are permuted, not mixed: the noise keeps its distribution exactly.
    assert torch.equal(shifted.flatten(1).sort().values, noise.flatten(1).sort().values)
    assert not torch.equal(shifted, noise)


def test_shift_gradient_in_the_offset_is_the_central_difference_of_whole_pixel_shifts():
    gen = torch.Generator().manual_seed(1)
    frames, weights = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    offsets = torch.tensor([[2.0, -1.0], [0.0, 3.0]], requires_grad=True)
    (weights * shift_frames(frames, offsets)).sum().backward()
    for axis in (0, 1):
        step = torch.zeros(2, 2)
        step[:, axis] = 1.0
        loss = [(weights * shift_frames(frames, offsets.detach() + s)).sum((1, 2, 3)) for s in (step, -step)]
        assert torch.allclose(offsets.grad[:, axis], (loss[0] - loss[1]) / 2, atol=1e-4)


def test_shift_gradient_in_the_frames_is_the_inverse_shift():
    frames = torch.randn(2, 3, 8, 8, requires_grad=True)
    offsets = torch.tensor([[1.0, 2.0], [-3.0, 0.0]])
    weights = torch.randn(2, 3, 8, 8)
    (weights * shift_frames(frames, offsets)).sum().backward()
    assert torch.equal(frames.grad, shift_frames(weights, -offsets))


def test_frame_offsets_are_centred_on_the_middle_frame():
    offsets = frame_offsets(torch.tensor([[2.0, 0.0], [0.0, -1.0]]), num_frames=4)
    assert offsets[0, :, 0].tolist() == [-3.0, -1.0, 1.0, 3.0] and offsets[1, :, 1].tolist() == [1.5, 0.5, -0.5, -1.5]


def test_whole_pixel_offsets_step_evenly_and_shifting_back_undoes_them():
    offsets = whole_pixel_offsets(torch.tensor([[1.0, 0.0], [2.25, -1.0]]), num_frames=8)
    assert offsets[0, :, 0].tolist() == [-3, -2, -1, 0, 1, 2, 3, 4]  # slow: one pixel per frame
    assert offsets[1, :, 0].tolist() == [-8, -6, -3, -1, 1, 3, 6, 8]  # fast: 2.25 on average
    frames = torch.randn(16, 3, 32, 32)
    flat = offsets.flatten(0, 1)
    assert torch.equal(shift_frames(shift_frames(frames, -flat), flat), frames)


def test_a_fresh_head_reads_every_caption_as_at_rest():
    head = TrajectoryHead(embed_dim=image_model.TEXT_DIM)
    assert torch.equal(head(torch.randn(3, 16, image_model.TEXT_DIM)), torch.zeros(3, 2))


@pytest.fixture(scope="module")
def moving_model() -> video_model.ClipModel:
    model = video_model.from_image_model(image_model.load_model(), seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*model.denoiser.motion_adapter.parameters(), *model.denoiser.trajectory_head.parameters()]:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model.denoiser.eval()
    return model


def test_the_denoiser_sees_each_clip_at_rest_in_the_shapes_frame(moving_model):
    """With velocity v, the output is the at-rest output of the frames shifted back by their
    offsets, shifted forward again: motion comes from the frame of reference alone."""
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 3, 32, 32, generator=gen), torch.randn(2, 16, image_model.TEXT_DIM, generator=gen)
    velocity = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    offsets = whole_pixel_offsets(velocity, 4).flatten(0, 1)
    with torch.no_grad():
        moving = moving_model.denoiser(x, 500, cond, velocity=velocity).sample
        at_rest = moving_model.denoiser(shift_frames(x.flatten(0, 1), -offsets).unflatten(0, (2, 4)), 500, cond,
                                        velocity=torch.zeros(2, 2)).sample
    assert torch.allclose(moving.flatten(0, 1), shift_frames(at_rest.flatten(0, 1), offsets), atol=1e-5)


def test_guidance_moves_both_halves_the_way_the_caption_asks(moving_model):
    backend = BuiltinClipBackend(moving_model)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, clips.NUM_FRAMES, 3, 32, 32, generator=gen)
    cond = backend.encode_prompts(["a red circle moving fast to the right", "a blue square moving slowly up"])
    uncond = backend.unconditional(2)
    t = torch.tensor([700, 700])
    with torch.no_grad():
        velocity = moving_model.denoiser.velocity(cond)
        out_u, out_c = backend.guided_model_outputs(x, t, uncond, cond)
        assert torch.allclose(out_u, moving_model.denoiser(x, t, uncond, velocity=velocity).sample, atol=1e-5)
        assert torch.allclose(out_c, moving_model.denoiser(x, t, cond).sample, atol=1e-5)
        assert not torch.allclose(out_u, moving_model.denoiser(x, t, uncond).sample, atol=1e-3)


def test_a_reward_on_motion_reaches_the_head(moving_model):
    """The shifts are whole pixels, yet a loss on the clip has a gradient in the head's weights."""
    backend = BuiltinClipBackend(moving_model)
    cond = backend.encode_prompts(["a red circle moving fast to the right"])
    x = torch.randn(1, clips.NUM_FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = moving_model.denoiser(x, 300, cond).sample
    out[:, -1, 0, :, 24:].sum().backward()  # "be red on the right in the last frame"
    grad = moving_model.denoiser.trajectory_head.velocity_out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    moving_model.denoiser.zero_grad(set_to_none=True)


def test_the_head_saves_and_loads(moving_model, tmp_path):
    moving_model.save(tmp_path / "clips")
    loaded = video_model.load_clip_model(tmp_path / "clips")
    cond = torch.randn(2, 16, image_model.TEXT_DIM)
    with torch.no_grad():
        assert torch.equal(loaded.denoiser.velocity(cond), moving_model.denoiser.velocity(cond))
    assert (tmp_path / "clips" / "trajectory_head" / "diffusion_pytorch_model.safetensors").is_file()


def test_clip_pretraining_resumes_bit_for_bit_and_teaches_the_head(tmp_path):
    from rlr_core.shapesworld import pretrain_clips

    common = ["--batch", "2", "--caption-batch", "8", "--threads", "1", "--warmup", "1", "--strip-steps", "1"]
    pretrain_clips.main(["--out", str(tmp_path / "straight"), "--steps", "2", "--every", "2", *common])
    pretrain_clips.main(["--out", str(tmp_path / "resumed"), "--steps", "1", "--every", "1", *common])
    pretrain_clips.main(["--out", str(tmp_path / "resumed"), "--steps", "2", "--every", "1", "--resume", *common])
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = a["trajectory_head.velocity_out.weight"]
    assert head.abs().sum() > 0  # it left its at-rest start
    assert json.loads((tmp_path / "straight" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (tmp_path / "straight" / "strip_000002.png").is_file()


def test_a_lora_round_can_move_the_velocity(moving_model, tmp_path):
    """The trajectory head's output layer is a LoRA target: training the adapter alone on a
    motion loss changes the velocity a caption is read as, and the saved version keeps it."""
    import copy

    from rlr_core.training.lora import add_lora, apply_version, write_version

    backend = BuiltinClipBackend(copy.deepcopy(moving_model))
    params = add_lora(backend, rank=2, seed=0)
    assert any("velocity_out" in n for n, _ in backend.denoiser.named_parameters() if "lora_B" in n)
    cond = backend.encode_prompts(["a red circle moving fast to the right"])
    before = backend.denoiser.velocity(cond).detach()
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (-backend.denoiser.velocity(cond)[:, 0]).sum().backward()  # "faster to the right"
        opt.step()
    assert backend.denoiser.velocity(cond)[0, 0] > before[0, 0] + 0.01
    write_version(backend, tmp_path / "v1", "lora", {}, {})
    fresh = BuiltinClipBackend(copy.deepcopy(moving_model))
    apply_version(fresh, tmp_path / "v1")
    with torch.no_grad():
        assert torch.allclose(fresh.denoiser.velocity(cond), backend.denoiser.velocity(cond), atol=1e-6)


def test_fitting_the_head_to_the_final_text_encoder_nears_its_floor():
    from rlr_core.shapesworld.pretrain_clips import fit_trajectory_head

    model = video_model.from_image_model(image_model.load_model(), seed=0)
    fit = fit_trajectory_head(model, steps=60, batch=64, lr=1e-2)
    # At rest the error is the mean squared velocity (about 1.2 per coordinate); the floor is
    # what captions without a direction or speed leave unpredictable.
    assert 0.2 < fit["mse_floor"] < fit["mse"] < 1.0
    assert not any(p.requires_grad for p in model.denoiser.trajectory_head.parameters())
