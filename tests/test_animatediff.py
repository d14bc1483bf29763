"""AnimateDiff as a video backend, on a tiny random AnimateDiff pipeline built from configs.

The loader takes the folder (and refuses broken ones with one line and exit code 2); the backend
draws clips (B, F, 3, H, W) in [0, 1]; one RLR estimate and optimiser step change the LoRA; a
version's exported LoRA loads into a fresh diffusers AnimateDiffPipeline and gives the backend's
clips for the same seed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AnimateDiffPipeline

from rlr_core import sampler
from rlr_core.backends.animatediff import AnimateDiffBackend
from rlr_core.backends.base import PromptError
from rlr_core.backends.loading import ModelLoadError, load_backend
from rlr_core.estimators import make_estimator
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.sampler import SamplerSettings
from rlr_core.training import lora
from tests.test_real_model import offline, run_main  # noqa: F401  (offline is a fixture)
from tests.tiny_animatediff import save_tiny_animatediff

FRAMES = 4  # of the tiny adapter's 8 positions: keeps every UNet call small
PROMPTS = ["a red cat", "a cat"]


@pytest.fixture(scope="module")
def ad_folder(tmp_path_factory) -> Path:
    return save_tiny_animatediff(tmp_path_factory.mktemp("models") / "tiny-ad")


@pytest.fixture(scope="module")
def loaded(ad_folder) -> AnimateDiffBackend:
    return load_backend(str(ad_folder), "cpu")


@pytest.fixture()
def backend(loaded) -> AnimateDiffBackend:
    """A 4-frame copy (its own UNet: LoRA added here does not leak into other tests)."""
    out = copy.deepcopy(loaded)
    out.num_frames = FRAMES
    return out


def redness(clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A differentiable clip reward: red minus the other channels, over every frame."""
    return (clips[:, :, 0] - 0.5 * (clips[:, :, 1] + clips[:, :, 2])).mean(dim=(1, 2, 3))


def test_the_loader_takes_an_animatediff_folder(loaded):
    assert isinstance(loaded, AnimateDiffBackend) and loaded.is_video
    assert loaded.name == "tiny-ad" and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.num_frames == 8  # 16 by default, capped by the adapter's 8 positions
    assert loaded.state_shape == (4, 8, 8, 8) and loaded.image_size == (16, 16)
    assert type(loaded.unet).__name__ == "UNetMotionModel"


def test_the_start_up_line_names_frames_and_frame_size(loaded):
    from app.services import ModelInfo

    # the summary alone, of the loaded backend (a whole app on a video backend is the app's tests' job)
    line = ModelInfo.of(loaded).device_summary()
    assert line.startswith("tiny-ad on cpu, float32, 8 frames of 16x16 ("), line


def test_a_clip_is_frames_in_unit_range_that_differ_by_frame_and_seed(backend):
    settings = SamplerSettings(steps=3, guidance=3.0)
    clips = sampler.generate(backend, PROMPTS, settings, seed=0)
    assert clips.shape == (2, FRAMES, 3, 16, 16)
    assert torch.isfinite(clips).all() and clips.min() >= 0 and clips.max() <= 1
    assert (clips[:, 0] - clips[:, 1]).abs().max() > 1e-3  # frames differ
    assert (clips[0] - clips[1]).abs().max() > 1e-3  # so do the clips of a batch
    assert torch.equal(clips, sampler.generate(backend, PROMPTS, settings, seed=0))  # a seed redraws it
    assert (clips - sampler.generate(backend, PROMPTS, settings, seed=1)).abs().max() > 1e-3


def test_the_motion_layers_tie_the_frames_together(backend):
    """The same noise in every frame: the temporal attention sees it, so changing one frame's
    noise changes the others' outputs (an image UNet would treat frames independently)."""
    x = torch.randn(1, *backend.state_shape, generator=torch.Generator().manual_seed(0))
    cond = backend.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        out = backend.model_output(x, torch.tensor([501]), cond)
        x2 = x.clone()
        x2[:, :, -1] += 1.0
        out2 = backend.model_output(x2, torch.tensor([501]), cond)
    assert out.shape == x.shape
    assert (out[:, :, 0] - out2[:, :, 0]).abs().max() > 1e-4


def test_prompts_over_the_token_limit_are_refused_not_cut(backend):
    with pytest.raises(PromptError, match="17 tokens long.*at most 14"):
        backend.check_prompt("a red cat with a blue dog")
    with pytest.raises(PromptError, match="empty"):
        backend.check_prompt("  ")
    assert backend.check_prompt(" a red cat ") == "a red cat"
    assert backend.describe_prompt("a red cat") == "✓ 5 / 14 tokens"


def test_the_chunked_checkpointed_decode_equals_the_plain_one(backend):
    x0 = torch.randn(2, *backend.state_shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
    plain = backend.decode(x0)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x0)
    trained = copy.deepcopy(backend)
    trained.prepare_for_training(True)
    assert trained.checkpoint_decode and not backend.checkpoint_decode
    chunked = trained.decode(x0)
    (g_chunked,) = torch.autograd.grad(chunked.square().sum(), x0)
    assert chunked.shape == (2, FRAMES, 3, 16, 16)
    assert torch.allclose(plain, chunked, atol=1e-5) and torch.allclose(g_plain, g_chunked, atol=1e-5)


def test_one_rlr_step_changes_the_lora(backend):
    backend.prepare_for_training(True)  # the CUDA path's checkpointing, here on the CPU
    params = lora.add_lora(backend, rank=2, seed=0)
    before = [p.detach().clone() for p in params]
    chain = BackendChain(backend, redness, SamplerSettings(steps=3, eta=1.0, guidance=1.0))
    result = make_estimator("rlr", block=1).accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(0))
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and max(g.abs().max() for g in grads) > 0
    assert torch.isfinite(torch.tensor(result.reward_mean))
    torch.optim.AdamW(params, lr=1e-2).step()
    assert max((p - b).abs().max() for p, b in zip(params, before)) > 1e-4


def test_an_exported_lora_loads_into_a_plain_animatediff_pipeline(backend, ad_folder, tmp_path):
    params = lora.add_lora(backend, rank=2, seed=0)
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init
        for p in params:
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    version = lora.write_version(backend, tmp_path / "v1", "lora", {"estimator": "rlr"}, {})
    assert (version / lora.LORA_WEIGHTS).is_file()

    pipe = AnimateDiffPipeline.from_pretrained(ad_folder)
    pipe.load_lora_weights(version)
    seed, steps, guidance = 5, 3, 3.0
    plain = pipe(PROMPTS, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance, eta=1.0,
                 generator=torch.Generator().manual_seed(seed), output_type="pt").frames
    settings = SamplerSettings(steps=steps, guidance=guidance, eta=1.0)
    ours = sampler.generate(backend, PROMPTS, settings, seed=seed)
    assert plain.shape == ours.shape == (2, FRAMES, 3, 16, 16)
    assert (ours - plain).abs().max() <= 1e-4
    lora.remove_lora(backend)
    base = sampler.generate(backend, PROMPTS, settings, seed=seed)
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the clips: the match means something

    reloaded = copy.deepcopy(backend)  # and the app's own loader reads the version back
    lora.apply_version(reloaded, version)
    assert (sampler.generate(reloaded, PROMPTS, settings, seed=seed) - ours).abs().max() <= 1e-5


def bad_folders(root: Path, good: Path) -> list[tuple[str, str]]:
    adapter_only = root / "adapter-only"
    shutil.copytree(good / "motion_adapter", adapter_only)
    no_adapter = root / "no-adapter"
    shutil.copytree(good, no_adapter)
    meta = json.loads((no_adapter / "model_index.json").read_text())
    del meta["motion_adapter"]
    (no_adapter / "model_index.json").write_text(json.dumps(meta))
    sdxl = root / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "AnimateDiffSDXLPipeline"}))
    broken = root / "broken"
    shutil.copytree(good, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    return [
        (str(adapter_only), "a motion adapter on its own.*AnimateDiffPipeline.from_pretrained"),
        (str(no_adapter), "this AnimateDiffPipeline folder lacks motion_adapter"),
        (str(sdxl), "a AnimateDiffSDXLPipeline is not served; video needs an AnimateDiffPipeline folder"),
        (str(broken), "the AnimateDiffPipeline in .* did not load \\(\\w+Error: .*diffusion_pytorch_model"),
    ]


def test_each_broken_animatediff_folder_is_refused_with_one_line(tmp_path, ad_folder):
    for model, message in bad_folders(tmp_path, ad_folder):
        with pytest.raises(ModelLoadError) as info:
            load_backend(model, "cpu")
        text = str(info.value)
        assert "\n" not in text and text.startswith(f"--model {model}: "), (model, text)
        assert re.search(message, text), (model, text)


def test_app_py_ends_with_that_line_and_exit_code_2(tmp_path, ad_folder, capsys, offline):  # noqa: F811
    model, message = bad_folders(tmp_path, ad_folder)[0]
    code, err = run_main(["--model", model, "--data-dir", str(tmp_path / "data"), "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --model {model}: "), err
    assert re.search(message, lines[0]), lines[0]
