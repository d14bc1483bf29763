"""Training rounds on the built-in UNet (random init): versions, progress, stopping, divergence, CLI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from rlr_core import rewards
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld import perception
from rlr_core.shapesworld.perception import PerceptionNet
from rlr_core.training import EstimatorConfig, Progress, TrainConfig, TrainingDiverged, lora, run_round
from rlr_core.training import cli as train
from rlr_core.training.round import _Guard

FAST = SamplerSettings(steps=3, eta=1.0, guidance=1.0)
PROMPTS = ["a red circle", "a blue square"]


def fresh_backend() -> BuiltinBackend:
    return BuiltinBackend(builtin_model.new_model(seed=0))


@pytest.fixture(scope="module")
def reward_fn():
    torch.manual_seed(1)
    return rewards.make_reward("prefer-colour:red", PerceptionNet().eval().requires_grad_(False))


def config(**kw) -> TrainConfig:
    base = dict(estimator=EstimatorConfig("rlr", {"block": 1}), steps=2, batch=2, prompts=PROMPTS,
                sampler=FAST, lr=1e-2, seed=0)
    return TrainConfig(**{**base, **kw})


def test_round_writes_a_version_that_reloads_exactly(tmp_path: Path, reward_fn) -> None:
    backend = fresh_backend()
    seen: list[Progress] = []
    result = run_round(backend, reward_fn, config(), tmp_path / "v1", progress=seen.append)
    assert [p.step for p in seen] == [1, 2] and seen[-1].total == 2 and seen[-1].samples == 4
    assert all(p.grad_norm > 0 and p.elapsed > 0 for p in seen)
    folder = result.version
    assert {f.name for f in folder.iterdir()} == {
        "pytorch_lora_weights.safetensors", "config.json", "metrics.json"}
    cfg, metrics = lora.read_version(folder)
    assert cfg["kind"] == "lora" and cfg["estimator"] == "rlr" and cfg["training"]["batch"] == 2
    assert metrics["steps_done"] == 2 and len(metrics["history"]) == 2 and not metrics["stopped_early"]
    # The trained adapter changed the model, and a fresh backend with the version applied matches it.
    want = generate(backend, PROMPTS, FAST, seed=5)
    other = fresh_backend()
    assert not torch.allclose(generate(other, PROMPTS, FAST, seed=5), want)
    lora.apply_version(other, folder)
    torch.testing.assert_close(generate(other, PROMPTS, FAST, seed=5), want)
    lora.remove_lora(other)
    torch.testing.assert_close(generate(other, PROMPTS, FAST, seed=5), generate(fresh_backend(), PROMPTS, FAST, 5))


def test_stop_event_ends_the_round_cleanly(tmp_path: Path, reward_fn) -> None:
    stop = threading.Event()

    def progress(p: Progress) -> None:
        stop.set()

    result = run_round(fresh_backend(), reward_fn, config(steps=5), tmp_path / "v", progress=progress, stop=stop)
    assert result.stopped and result.metrics["steps_done"] == 1 and result.version.exists()
    # A callback returning True stops too.
    result = run_round(fresh_backend(), reward_fn, config(steps=5), tmp_path / "w", progress=lambda p: True)
    assert result.stopped and result.metrics["steps_done"] == 1


def test_nan_reward_stops_with_a_clear_error_and_writes_nothing(tmp_path: Path, reward_fn) -> None:
    backend = fresh_backend()
    good = run_round(backend, reward_fn, config(steps=1), tmp_path / "good")
    lora.apply_version(backend, good.version)
    weights = [p.detach().clone() for n, p in backend.denoiser.named_parameters() if "lora_" in n]
    calls = []

    def flaky(images, prompts):
        calls.append(1)
        r = reward_fn(images, prompts)
        return r * float("nan") if len(calls) > 1 else r

    # The NaN reaches the round through the reward itself or through the baseline's rewards (RLR's
    # default state baseline calls the reward too): either way the round stops and says which.
    with pytest.raises(TrainingDiverged, match="(reward|loss) is nan"):
        run_round(backend, flaky, config(steps=3), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()
    assert (tmp_path / "good" / "metrics.json").exists()
    after = [p.detach() for n, p in backend.denoiser.named_parameters() if "lora_" in n]
    assert all(torch.equal(a, b) for a, b in zip(after, weights))  # back to the last good version


def test_guard_detects_an_exploding_gradient() -> None:
    guard = _Guard([torch.nn.Parameter(torch.zeros(2))], explode_factor=100)
    for norm in (1.0, 2.0, 1.5, 1.0, 2.0, 150.0):
        guard.check_grad_norm(norm)
    with pytest.raises(TrainingDiverged, match="exploded"):
        guard.check_grad_norm(1e4)
    with pytest.raises(TrainingDiverged, match="inf"):
        guard.check_grad_norm(float("inf"))


def test_dcot_round_with_a_block_window(tmp_path: Path, reward_fn) -> None:
    stages = {"a red circle": ["a shape", "a circle", "a red circle"]}
    rlr = EstimatorConfig("rlr", {"block": 1, "window": (2, 3)})
    result = run_round(fresh_backend(), reward_fn, config(steps=1, stage_prompts=stages, estimator=rlr),
                       tmp_path / "dcot")
    assert result.metrics["history"][0]["block_start_mean"] in (2.0, 2.5, 3.0)


def test_full_finetuning_and_ddpo(tmp_path: Path, reward_fn) -> None:
    backend = fresh_backend()
    before = backend.denoiser.conv_in.weight.detach().clone()
    result = run_round(backend, reward_fn, config(steps=1, finetune="full", lr=1e-3,
                                                  estimator=EstimatorConfig("ddpo", {"inner_epochs": 2,
                                                                                     "clip_range": 0.2})),
                       tmp_path / "full")
    assert (result.version / "denoiser.safetensors").exists()
    assert not torch.equal(backend.denoiser.conv_in.weight, before)
    other = fresh_backend()
    lora.apply_version(other, result.version)
    torch.testing.assert_close(other.denoiser.conv_in.weight, backend.denoiser.conv_in.weight)


def test_cli_runs_a_round(tmp_path: Path) -> None:
    builtin_model.new_model(seed=0).save(tmp_path / "model")
    torch.manual_seed(0)
    perception.save(PerceptionNet(), tmp_path / "perception", {"note": "random"})
    out = tmp_path / "cli-version"
    code = train.main([
        "--estimator", "rlr", "--block", "1", "--rest", "lr", "--steps", "1", "--batch", "2",
        "--prompts", "a red circle", "a small square", "--reward", "fidelity+prefer-large",
        "--sampling-steps", "3", "--guidance", "1", "--model", str(tmp_path / "model"),
        "--perception", str(tmp_path / "perception"), "--out", str(out), "--cpu",
    ])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["estimator_settings"]["block"] == 1 and cfg["training"]["sampler"]["steps"] == 3


@pytest.mark.slow
def test_cli_runs_data_parallel_in_two_processes(tmp_path: Path) -> None:
    """The multi-GPU path, run as two CPU processes (gloo) under torchrun, the launcher that
    ``accelerate launch --multi_gpu`` uses (its ``--cpu`` mode runs a single process): gradients
    are averaged across them, the main process writes the version, and the sample count covers
    both processes' batches."""
    import subprocess
    import sys

    builtin_model.new_model(seed=0).save(tmp_path / "model")
    torch.manual_seed(0)
    perception.save(PerceptionNet(), tmp_path / "perception", {"note": "random"})
    out = tmp_path / "two-process-version"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlr_core.training",
           "--cpu", "--threads", "1", "--estimator", "rlr", "--block", "1",
           "--steps", "2", "--batch", "2", "--prompts", "a red circle", "a blue square",
           "--reward", "prefer-colour:red", "--sampling-steps", "3", "--guidance", "1",
           "--model", str(tmp_path / "model"), "--perception", str(tmp_path / "perception"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_done"] == 2 and metrics["samples"] == 2 * 2 * 2
    assert (out / "pytorch_lora_weights.safetensors").exists()


def _randomise(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def _lora_update(backend: BuiltinBackend) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change B @ A (scaling 1: alpha = rank)."""
    weights = dict(backend.denoiser.named_parameters())
    return {name.replace("lora_B.rlr.weight", ""): weight.detach().flatten(1) @
            weights[name.replace("lora_B", "lora_A")].detach().flatten(1)
            for name, weight in weights.items() if "lora_B.rlr" in name}


def test_scaling_back_an_adapter_on_the_base_model_scales_its_change_exactly() -> None:
    base, trained = fresh_backend(), fresh_backend()
    _randomise(lora.add_lora(trained, rank=2, seed=0), seed=1)
    full = _lora_update(trained)
    frozen = {k: v.clone() for k, v in trained.denoiser.state_dict().items() if "lora_" not in k}
    lora.scale_back(trained, base, "lora")
    for layer, change in _lora_update(trained).items():
        torch.testing.assert_close(change, 0.5 * full[layer])
    lora.scale_back(trained, base, "lora")  # twice: a quarter
    for layer, change in _lora_update(trained).items():
        torch.testing.assert_close(change, 0.25 * full[layer])
    for name, value in trained.denoiser.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, frozen[name])  # the base weights are not touched


def test_scaling_back_goes_halfway_to_the_parents_adapter_or_weights() -> None:
    parent, trained = fresh_backend(), fresh_backend()
    _randomise(lora.add_lora(parent, rank=2, seed=0), seed=1)
    _randomise(lora.add_lora(trained, rank=2, seed=0), seed=2)
    before = {n: p.detach().clone() for n, p in trained.denoiser.named_parameters() if "lora_" in n}
    lora.scale_back(trained, parent, "lora")
    own = dict(parent.denoiser.named_parameters())
    for name, value in trained.denoiser.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value.detach(), (before[name] + own[name].detach()) / 2)
    # full fine-tuning: every weight, halfway
    parent, trained = fresh_backend(), BuiltinBackend(builtin_model.new_model(seed=1))
    start = {k: v.clone() for k, v in trained.denoiser.state_dict().items()}
    lora.scale_back(trained, parent, "full", keep=0.25)
    reference = parent.denoiser.state_dict()
    for name, value in trained.denoiser.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[name] + 0.25 * (start[name] - reference[name]))
    with pytest.raises(ValueError, match="keep"):
        lora.scale_back(trained, parent, "full", keep=1.5)
