"""Stable Diffusion 3 (a tiny one built from configs, tests/tiny_flow.py) behind the backend
interface: generation is the plain pipeline's ODE, training runs the SDE, every estimator's
gradient is finite, full BP is autograd of the unrolled SDE, and the LoRA export loads in a
fresh plain pipeline (method doc section 10)."""

from __future__ import annotations

import pytest
import torch

from rlr_core import sampler
from rlr_core.backends.flow_models import SD3Backend
from rlr_core.estimators import DDPO, RLR, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.flow import FlowSchedule
from rlr_core.training import lora
from tests.tiny_flow import load_tiny_sd3, save_tiny_sd3

PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def backend(folder) -> SD3Backend:
    return SD3Backend.from_pipeline(load_tiny_sd3(folder), name="tiny-sd3")


def mean_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def chain(backend: SD3Backend) -> BackendChain:
    trained = __import__("copy").deepcopy(backend)
    lora.add_lora(trained, rank=2, seed=0)
    with torch.no_grad():  # a non-zero B so that every LoRA weight gets a gradient
        for name, p in trained.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return BackendChain(trained, mean_brightness, sampler.SamplerSettings(steps=4, eta=1.0, guidance=1.0))


def grad_of(chain: BackendChain, est, seed: int = 0) -> torch.Tensor:
    for p in chain.parameters():
        p.grad = None
    est.accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(seed))
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in chain.parameters()])


def test_generation_is_the_plain_pipelines_ode(backend: SD3Backend, folder) -> None:
    sched = sampler.schedule_for(backend, 4, 1.0)
    assert isinstance(sched, FlowSchedule) and float(sched.sigma.abs().max()) == 0
    train = sampler.schedule_for(backend, 4, 1.0, training=True)
    assert float(train.sigma[1:].min()) > 0 and train.noise_level == pytest.approx(0.7)
    pipe = load_tiny_sd3(folder)
    for guidance in (1.0, 3.0):
        ours = sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=4, guidance=guidance), seed=3)
        theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, height=16, width=16,
                      generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
        assert float((ours - theirs).abs().max()) <= 1e-5


def test_the_chain_trains_on_the_sde(chain: BackendChain) -> None:
    assert isinstance(chain.schedule, FlowSchedule) and float(chain.sigma[1:].min()) > 0
    names = [n for n, _ in chain.named_parameters()]
    assert names and all("lora_" in n for n in names)


def test_full_bp_is_autograd_of_the_unrolled_sde(chain: BackendChain) -> None:
    """The estimate against a hand-unrolled Euler-Maruyama chain with the same noise draws."""
    full = grad_of(chain, FullBackprop(use_checkpoint=False))
    assert torch.isfinite(full).all() and full.norm() > 0
    torch.testing.assert_close(grad_of(chain, FullBackprop()), full)

    backend, sched = chain.backend, chain.schedule
    ctx = chain.context(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    x = backend.initial_noise(len(PROMPTS), gen)
    for k in range(sched.num_steps, 0, -1):
        t, t_prev, s = (float(v[k]) for v in (sched.t, sched.t_prev, sched.noise_coef))
        v = backend.model_output(x, torch.full((len(x),), float(sched.timesteps[k])), ctx.cond.at(k))
        drift = v + s**2 / (2 * t) * (x + (1 - t) * v)
        x = x - drift * (t - t_prev) + s * (t - t_prev) ** 0.5 * torch.randn(x.shape, generator=gen)
    loss = -mean_brightness(backend.decode(x), PROMPTS).mean()
    manual = torch.autograd.grad(loss, chain.parameters())
    manual = torch.cat([g.flatten() for g in manual])
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


def test_ddpo_first_step_is_lr(chain: BackendChain) -> None:
    lr = grad_of(chain, LikelihoodRatio(chunk=16))
    assert float((grad_of(chain, DDPO(chunk=3)) - lr).norm()) <= 1e-3 * float(lr.norm())


def test_step_log_prob_is_the_recorded_one(chain: BackendChain) -> None:
    ctx = chain.context(PROMPTS)
    traj = chain.rollout(ctx, torch.Generator().manual_seed(1))
    for k in range(1, chain.num_steps + 1):
        with torch.no_grad():
            logp = sampler.step_log_prob(chain.backend, chain.schedule, traj.x[k], traj.x[k - 1], k, ctx.cond, 1.0)
        normal = torch.distributions.Normal(traj.mean[k], chain.sigma[k].expand_as(traj.mean[k]))
        torch.testing.assert_close(logp, traj.log_prob[k], rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(logp, normal.log_prob(traj.x[k - 1]).flatten(1).sum(1), rtol=1e-5, atol=1e-3)


def test_lora_export_loads_in_a_plain_pipeline(backend: SD3Backend, folder, tmp_path) -> None:
    trained = __import__("copy").deepcopy(backend)
    lora.add_lora(trained, rank=2, seed=0)
    with torch.no_grad():
        for name, p in trained.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    settings = sampler.SamplerSettings(steps=4, guidance=3.0)
    ours = sampler.generate(trained, ["a red cat"], settings, seed=5)
    base = sampler.generate(backend, ["a red cat"], settings, seed=5)
    assert float((ours - base).abs().max()) > 1e-2  # the LoRA changes the image
    version = lora.write_version(trained, tmp_path / "v1", "lora", {}, {})
    pipe = load_tiny_sd3(folder)
    pipe.load_lora_weights(str(version), weight_name=lora.LORA_WEIGHTS)
    theirs = pipe("a red cat", num_inference_steps=4, guidance_scale=3.0, height=16, width=16,
                  generator=torch.Generator("cpu").manual_seed(5), output_type="pt").images
    assert float((ours - theirs).abs().max()) <= 1e-4
    again = __import__("copy").deepcopy(backend)  # and the app reads its own export back
    lora.apply_version(again, version)
    torch.testing.assert_close(sampler.generate(again, ["a red cat"], settings, seed=5), ours)


def test_load_backend_serves_an_sd3_folder(folder) -> None:
    from rlr_core.backends.loading import load_backend

    loaded = load_backend(str(folder), "cpu", "fp32")
    assert isinstance(loaded, SD3Backend) and loaded.family == "stable-diffusion-3"
    assert loaded.image_size == (16, 16)
