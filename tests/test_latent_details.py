"""Details of the diffusers path: shared frozen parts between versions, gradient checkpointing in a
training step, older peft-format version folders, and dtype choice."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from rlr_core.backends.latent import DiffusersLatentBackend
from rlr_core.backends.loading import ModelLoadError, load_backend, resolve_dtype
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.training import EstimatorConfig, TrainConfig, lora, run_round
from tests.tiny_sd import save_tiny_pipeline

FAST = SamplerSettings(steps=3, eta=1.0, guidance=2.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("m") / "tiny-sd")


def test_versions_share_the_frozen_vae_and_text_encoder(folder):
    backend = load_backend(folder)
    assert isinstance(backend, DiffusersLatentBackend) and backend.name == "tiny-sd"
    twin = copy.deepcopy(backend)
    assert twin.vae is backend.vae and twin.text_encoder is backend.text_encoder
    assert twin.unet is not backend.unet and twin.scheduler is not backend.scheduler
    lora.add_lora(twin, rank=2, seed=0)
    assert not lora.has_lora(backend)  # the served model is untouched by the copy's adapter


def test_a_training_step_with_gradient_checkpointing(folder, tmp_path):
    backend = load_backend(folder)
    backend.prepare_for_training(gradient_checkpointing=True)
    assert backend.unet.is_gradient_checkpointing
    redness = lambda im, p: (im[:, 0] - im[:, 1]).mean(dim=(1, 2))  # noqa: E731
    result = run_round(backend, redness, TrainConfig(estimator=EstimatorConfig("rlr", {"block": "auto"}),
                                                     steps=1, batch=2, prompts=["a red cat"], sampler=FAST,
                                                     lr=1e-2), tmp_path / "v")
    assert result.metrics["steps_done"] == 1 and result.metrics["history"][0]["block"] >= 1
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(backend))


def test_older_peft_format_versions_still_load(folder, tmp_path):
    trained = load_backend(folder)
    params = lora.add_lora(trained, rank=2, alpha=4, seed=0)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.05)
    old = tmp_path / "old-version"
    old.mkdir()
    save_file(get_peft_model_state_dict(trained.unet, adapter_name=lora.ADAPTER_NAME), old / lora.PEFT_WEIGHTS)
    trained.unet.peft_config[lora.ADAPTER_NAME].save_pretrained(str(old))
    (old / "config.json").write_text(json.dumps({"kind": "lora"}))
    (old / "metrics.json").write_text("{}")
    fresh = load_backend(folder)
    lora.apply_version(fresh, old)
    want = generate(trained, ["a red cat"], FAST, seed=1)
    assert torch.equal(generate(fresh, ["a red cat"], FAST, seed=1), want)
    assert not torch.equal(generate(load_backend(folder), ["a red cat"], FAST, seed=1), want)


def test_dtype_choice():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float32  # half precision only on CUDA
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="choose auto"):
        resolve_dtype("int8", "cuda")


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no such folder or file"):
        load_backend("models/tiny-sdd")  # looks like org/name, but models/ is a local folder
