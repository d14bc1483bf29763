"""FLUX.1 (a tiny one built from configs, tests/tiny_flow.py) behind the backend interface, as
tests/test_flow_backends.py checks SD3: generation is the plain FluxPipeline's ODE (packed 2x2
latents, img_ids/txt_ids, the dynamic shift mu, dev's embedded guidance, schnell's none), training
runs the SDE, every estimator's gradient is finite, full BP is autograd of the unrolled SDE, the
LoRA export loads in a fresh plain FluxPipeline, and load_backend serves FluxPipeline folders."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from rlr_core import sampler
from rlr_core.backends.flow_models import FluxBackend
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.flow import FlowSchedule
from tests import flow_backend_checks as checks
from tests.tiny_flow import load_tiny_flux, save_tiny_flux

PROMPTS = checks.PROMPTS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-dev")


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-schnell", guidance_embeds=False)


@pytest.fixture(scope="module")
def backend(folder) -> FluxBackend:
    return FluxBackend.from_pipeline(load_tiny_flux(folder), name="tiny-flux-dev")


@pytest.fixture(scope="module")
def chain(backend: FluxBackend) -> BackendChain:
    return checks.lora_chain(backend, guidance=3.5)


def test_the_schedule_is_the_pipelines(backend: FluxBackend) -> None:
    """FluxPipeline's sigmas linspace(1, 1/K, K), shifted by mu from the image's token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = sampler.schedule_for(backend, 4, 1.0)
    assert isinstance(sched, FlowSchedule) and float(sched.sigma.abs().max()) == 0  # generation: the ODE
    assert backend.image_seq_len == 16  # 8x8 latents in 2x2 patches
    ref = copy.deepcopy(backend.scheduler)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(sched.timesteps[1:].flip(0), ref.timesteps.float())
    train = sampler.schedule_for(backend, 4, 1.0, training=True)
    assert float(train.sigma[1:].min()) > 0 and train.noise_level == pytest.approx(0.9)  # Flow-GRPO's FLUX a


def test_generation_is_the_plain_pipelines_ode(backend: FluxBackend, folder) -> None:
    pipe = load_tiny_flux(folder)
    images = {}
    for guidance in (1.0, 3.5):
        ours = sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=4, guidance=guidance), seed=3)
        assert float((ours - checks.plain(pipe, PROMPTS, 4, guidance, 3)).abs().max()) <= 1e-5
        images[guidance] = ours
    assert float((images[1.0] - images[3.5]).abs().max()) > 0  # dev's embedded guidance is an input


def test_schnell_has_no_guidance(schnell_folder) -> None:
    backend = FluxBackend.from_pipeline(load_tiny_flux(schnell_folder), name="tiny-flux-schnell")
    assert not backend.guidance_embeds
    pipe = load_tiny_flux(schnell_folder)
    ours = sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=3, guidance=3.5), seed=1)
    assert float((ours - checks.plain(pipe, PROMPTS, 3, 3.5, 1)).abs().max()) <= 1e-5
    torch.testing.assert_close(ours, sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=3), seed=1))


def test_no_classifier_free_guidance(backend: FluxBackend) -> None:
    """Guidance is the model's input: one model call per step, no unconditional embedding."""
    cond = sampler.prompt_conditioning(backend, PROMPTS, 4, guidance=3.5)
    assert cond.uncond is None
    calls = []
    original = backend.model_output

    def counting(x, t, c, guidance=None):
        calls.append((len(x), guidance))
        return original(x, t, c, guidance=guidance)

    backend.model_output = counting
    try:
        sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=3, guidance=3.5), seed=0)
    finally:
        del backend.model_output
    assert calls == [(2, 3.5)] * 3


def test_packing_round_trips(backend: FluxBackend) -> None:
    x = torch.randn(2, *backend.state_shape)
    tokens = backend.pack_latents(x)
    assert tokens.shape == (2, 16, 16)
    torch.testing.assert_close(backend.unpack_latents(tokens, 8, 8), x, rtol=0, atol=0)


def test_the_chain_trains_on_the_sde(chain: BackendChain) -> None:
    assert isinstance(chain.schedule, FlowSchedule) and float(chain.sigma[1:].min()) > 0
    names = [n for n, _ in chain.named_parameters()]
    assert names and all("lora_" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names) and any("add_q_proj" in n for n in names)


def test_full_bp_is_autograd_of_the_unrolled_sde(chain: BackendChain) -> None:
    checks.check_full_bp_is_autograd_of_the_unrolled_sde(chain, guidance=3.5)


def test_pathwise_estimators_agree_where_they_must(chain: BackendChain) -> None:
    checks.check_pathwise_estimators_agree(chain)


@pytest.mark.parametrize("name,make", checks.ESTIMATORS)
def test_every_estimator_gives_a_finite_gradient(chain: BackendChain, name: str, make) -> None:
    checks.check_finite_gradient(chain, name, make)


def test_step_log_prob_is_the_recorded_one(chain: BackendChain) -> None:
    checks.check_step_log_prob(chain, 3.5)


def test_lora_export_loads_in_a_plain_flux_pipeline(backend: FluxBackend, folder, tmp_path) -> None:
    checks.check_lora_export_loads_in_a_plain_pipeline(backend, lambda: load_tiny_flux(folder), 3.5, tmp_path)


def test_a_backend_that_has_encoded_pickles(backend: FluxBackend) -> None:
    """The CPU round process gets the backend by pickle (rlr_core/backends/picklable.py)."""
    before = backend.encode_prompts(PROMPTS)  # transformers hooks the text encoders on first use
    again = pickle.loads(pickle.dumps(copy.deepcopy(backend)))
    assert again.pipe.transformer is again.transformer
    torch.testing.assert_close(again.encode_prompts(PROMPTS), before)


def test_load_backend_serves_flux_folders(folder, schnell_folder) -> None:
    from rlr_core.backends.loading import load_backend

    for f, embeds in ((folder, True), (schnell_folder, False)):
        loaded = load_backend(str(f), "cpu", "fp32")
        assert isinstance(loaded, FluxBackend) and loaded.family == "flux"
        assert loaded.image_size == (16, 16) and loaded.guidance_embeds is embeds
