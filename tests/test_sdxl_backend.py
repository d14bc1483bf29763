"""Stable Diffusion XL on a tiny random pipeline (tests/tiny_sdxl.py): loaded by path, the packed
conditioning (tokens + pooled embedding in one tensor), the same images as a plain
StableDiffusionXLPipeline for the same seed, every estimator's gradient, a version's LoRA in a plain
pipeline, and the one-line messages for SDXL-family folders the app does not serve."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from rlr_core.backends.load_errors import ModelLoadError
from rlr_core.backends.loading import load_backend
from rlr_core.backends.sdxl import SDXLBackend
from rlr_core.estimators import ESTIMATORS, make_estimator
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.training import lora
from tests.tiny_sdxl import save_tiny_sdxl, tiny_sdxl_pipeline

PROMPTS = ["a red cat", "a blue dog"]


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean(dim=(1, 2))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def backend(folder) -> SDXLBackend:
    return load_backend(folder, "cpu", "fp32")


def plain_images(pipe: StableDiffusionXLPipeline, prompts: list[str], seed: int, steps: int,
                 guidance: float) -> torch.Tensor:
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the app's sampler: DDIM, eta 1
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=1.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def test_a_folder_loads_as_the_sdxl_backend(backend: SDXLBackend) -> None:
    assert isinstance(backend, SDXLBackend) and backend.family == "stable-diffusion-xl"
    assert backend.name == "tiny-sdxl" and backend.state_shape == (4, 8, 8) and backend.image_size == (16, 16)
    cond = backend.encode_prompts(PROMPTS)
    assert cond.shape == (2, 16 + 1, 64)  # 16 token rows, one row for the 32-d pooled embedding
    assert backend.unconditional(2).shape == cond.shape and not backend.unconditional(2).any()
    assert backend.check_prompt(" a red cat ") == "a red cat" and backend.max_prompt_tokens == 14
    twin = copy.deepcopy(backend)  # a version: its own UNet, the frozen parts shared
    assert twin.unet is not backend.unet and twin.text_encoder_2 is backend.text_encoder_2


def test_pack_and_unpack_are_inverse_also_when_the_pooled_embedding_is_wider_than_a_token() -> None:
    wide = SDXLBackend.from_pipeline(tiny_sdxl_pipeline(pooled_dim=80), name="wide")  # 80 > 64: two rows
    assert wide.pooled_rows == 2
    tokens, pooled = torch.randn(3, 16, 64), torch.randn(3, 80)
    packed = wide.pack(tokens, pooled)
    assert packed.shape == (3, 18, 64)
    got_tokens, got_pooled = wide.unpack(packed)
    assert torch.equal(got_tokens, tokens) and torch.equal(got_pooled, pooled)


@pytest.mark.parametrize("pooled_dim", [32, 80])
def test_images_match_a_plain_sdxl_pipeline_for_the_same_seed(pooled_dim: int) -> None:
    pipe = tiny_sdxl_pipeline(pooled_dim)
    backend = SDXLBackend.from_pipeline(pipe, name="tiny")
    for guidance in (1.0, 3.0):
        ours = generate(backend, PROMPTS, SamplerSettings(steps=3, eta=1.0, guidance=guidance), seed=11)
        plain = plain_images(pipe, PROMPTS, 11, 3, guidance)
        assert (ours - plain).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def chain(folder) -> BackendChain:
    backend = load_backend(folder, "cpu", "fp32")
    params = lora.add_lora(backend, rank=2, seed=0)
    with torch.no_grad():
        for p in params[1::2]:  # lora_B: non-zero so that every adapter weight gets a gradient
            p.normal_(0, 0.01)
    return BackendChain(backend, redness, SamplerSettings(steps=3, eta=1.0, guidance=2.0))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_gives_a_finite_nonzero_gradient(chain: BackendChain, name: str) -> None:
    for p in chain.parameters():
        p.grad = None
    est = make_estimator(name).accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(0))
    assert torch.isfinite(est.rewards).all()
    grads = [p.grad for p in chain.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), name
    assert sum(float(g.norm()) for g in grads) > 0, name


def test_a_version_loads_in_a_plain_sdxl_pipeline(folder: Path, tmp_path: Path) -> None:
    backend = load_backend(folder, "cpu", "fp32")
    params = lora.add_lora(backend, rank=2, seed=0)
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0, 0.3)
    version = lora.write_version(backend, tmp_path / "v1", "lora", {}, {})
    settings = SamplerSettings(steps=3, eta=1.0, guidance=3.0)
    ours = generate(backend, PROMPTS, settings, seed=5)
    lora.remove_lora(backend)
    base = generate(backend, PROMPTS, settings, seed=5)

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.load_lora_weights(version)
    plain = plain_images(pipe, PROMPTS, 5, 3, 3.0)
    assert (ours - plain).abs().max() <= 1e-4
    assert (ours - base).abs().max() > 1e-2


def write_index(folder: Path, class_name: str, components: list[str]) -> Path:
    folder.mkdir(parents=True)
    meta = {"_class_name": class_name, **{c: ["diffusers", "X"] for c in components}}
    (folder / "model_index.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("class_name, components, message", [
    ("StableDiffusionXLImg2ImgPipeline", ["unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"],
     "found a StableDiffusionXLImg2ImgPipeline pipeline without text_encoder, tokenizer; .*serves a "
     "StableDiffusionXLPipeline folder"),
    ("PixArtAlphaPipeline", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"],
     "not a text-to-image pipeline this app can serve: found a PixArtAlphaPipeline pipeline.*"
     "Stable Diffusion 1.x/2.x.*Stable Diffusion XL folder \\(StableDiffusionXLPipeline"),
])
def test_unserved_pipelines_get_one_line_naming_what_is_served(tmp_path, class_name, components, message) -> None:
    import re

    folder = write_index(tmp_path / class_name, class_name, components)
    with pytest.raises(ModelLoadError) as info:
        load_backend(folder, "cpu", "fp32")
    text = str(info.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"--model {folder}: ")
    assert re.search(message, text), text
