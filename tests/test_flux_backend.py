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
from rlr_core.estimators import DDPO, RLR, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.flow import FlowSchedule
from rlr_core.training import lora
from tests.test_flow_backends import PROMPTS, grad_of, mean_brightness
from tests.tiny_flow import load_tiny_flux, save_tiny_flux


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
    trained = copy.deepcopy(backend)
    lora.add_lora(trained, rank=2, seed=0)
    with torch.no_grad():  # a non-zero B so that every LoRA weight gets a gradient
        for name, p in trained.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return BackendChain(trained, mean_brightness, sampler.SamplerSettings(steps=4, eta=1.0, guidance=3.5))


def plain(pipe, prompts, steps: int, guidance: float, seed: int) -> torch.Tensor:
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images


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
        assert float((ours - plain(pipe, PROMPTS, 4, guidance, 3)).abs().max()) <= 1e-5
        images[guidance] = ours
    assert float((images[1.0] - images[3.5]).abs().max()) > 0  # dev's embedded guidance is an input


def test_schnell_has_no_guidance(schnell_folder) -> None:
    backend = FluxBackend.from_pipeline(load_tiny_flux(schnell_folder), name="tiny-flux-schnell")
    assert not backend.guidance_embeds
    pipe = load_tiny_flux(schnell_folder)
    ours = sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=3, guidance=3.5), seed=1)
    assert float((ours - plain(pipe, PROMPTS, 3, 3.5, 1)).abs().max()) <= 1e-5
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
    full = grad_of(chain, FullBackprop(use_checkpoint=False))
    assert torch.isfinite(full).all() and full.norm() > 0
    torch.testing.assert_close(grad_of(chain, FullBackprop()), full)

    backend, sched = chain.backend, chain.schedule
    ctx = chain.context(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    x = backend.initial_noise(len(PROMPTS), gen)
    for k in range(sched.num_steps, 0, -1):
        t, t_prev, s = (float(v[k]) for v in (sched.t, sched.t_prev, sched.noise_coef))
        v = backend.model_output(x, torch.full((len(x),), float(sched.timesteps[k])), ctx.cond.at(k), guidance=3.5)
        drift = v + s**2 / (2 * t) * (x + (1 - t) * v)
        x = x - drift * (t - t_prev) + s * (t - t_prev) ** 0.5 * torch.randn(x.shape, generator=gen)
    loss = -mean_brightness(backend.decode(x), PROMPTS).mean()
    manual = torch.cat([g.flatten() for g in torch.autograd.grad(loss, chain.parameters())])
    assert float((full - manual).norm()) <= 1e-4 * float(manual.norm())


def test_pathwise_estimators_agree_where_they_must(chain: BackendChain) -> None:
    full = grad_of(chain, FullBackprop())
    torch.testing.assert_close(grad_of(chain, TruncatedBackprop(steps=4)), full)
    torch.testing.assert_close(grad_of(chain, RLR(tail=4)), full)  # FO tail = whole chain


@pytest.mark.parametrize("name,make", [
    ("rlr", lambda: RLR()), ("rlr-h1-tail1", lambda: RLR(block=1, tail=1)), ("rlr-zo", lambda: RLR(rest="zo")),
    ("truncated-bp", lambda: TruncatedBackprop(steps=2)), ("full-bp", lambda: FullBackprop()),
    ("ddpo", lambda: DDPO(chunk=3)), ("lr", lambda: LikelihoodRatio()),
])
def test_every_estimator_gives_a_finite_gradient(chain: BackendChain, name: str, make) -> None:
    g = grad_of(chain, make())
    assert torch.isfinite(g).all() and g.norm() > 0, name


def test_step_log_prob_is_the_recorded_one(chain: BackendChain) -> None:
    ctx = chain.context(PROMPTS)
    traj = chain.rollout(ctx, torch.Generator().manual_seed(1))
    for k in range(1, chain.num_steps + 1):
        with torch.no_grad():
            logp = sampler.step_log_prob(chain.backend, chain.schedule, traj.x[k], traj.x[k - 1], k, ctx.cond, 3.5)
        torch.testing.assert_close(logp, traj.log_prob[k], rtol=1e-5, atol=1e-3)


def test_lora_export_loads_in_a_plain_flux_pipeline(backend: FluxBackend, folder, tmp_path) -> None:
    trained = copy.deepcopy(backend)
    lora.add_lora(trained, rank=2, seed=0)
    with torch.no_grad():
        for name, p in trained.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    settings = sampler.SamplerSettings(steps=4, guidance=3.5)
    ours = sampler.generate(trained, ["a red cat"], settings, seed=5)
    base = sampler.generate(backend, ["a red cat"], settings, seed=5)
    assert float((ours - base).abs().max()) > 1e-2  # the LoRA changes the image
    version = lora.write_version(trained, tmp_path / "v1", "lora", {}, {})
    pipe = load_tiny_flux(folder)
    pipe.load_lora_weights(str(version), weight_name=lora.LORA_WEIGHTS)
    assert float((ours - plain(pipe, ["a red cat"], 4, 3.5, 5)).abs().max()) <= 1e-4
    again = copy.deepcopy(backend)  # and the app reads its own export back
    lora.apply_version(again, version)
    torch.testing.assert_close(sampler.generate(again, ["a red cat"], settings, seed=5), ours)


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
