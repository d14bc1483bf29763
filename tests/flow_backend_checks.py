"""The checks tests/test_flow_backends.py (SD3) and tests/test_flux_backend.py (FLUX) share on a
flow-matching backend: a LoRA'd training chain on the reverse SDE, full BP as autograd of the
hand-unrolled Euler-Maruyama chain, the pathwise estimators' agreement, every estimator's finite
gradient, the recorded step log-probabilities, and the LoRA export in a fresh plain pipeline."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from rlr_core import sampler
from rlr_core.estimators import DDPO, RLR, FullBackprop, LikelihoodRatio, TruncatedBackprop
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.training import lora

PROMPTS = ["a red cat", "a blue dog"]
# Every estimator with the options that exercise it, for @pytest.mark.parametrize("name,make", ...).
ESTIMATORS = [
    ("rlr", lambda: RLR()), ("rlr-h1-tail1", lambda: RLR(block=1, tail=1)), ("rlr-zo", lambda: RLR(rest="zo")),
    ("truncated-bp", lambda: TruncatedBackprop(steps=2)), ("full-bp", lambda: FullBackprop()),
    ("ddpo", lambda: DDPO(chunk=3)), ("lr", lambda: LikelihoodRatio()),
]


def mean_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def with_random_lora(backend, std: float):
    """A copy of ``backend`` with a rank-2 LoRA whose B is random (zero B would change nothing)."""
    trained = copy.deepcopy(backend)
    lora.add_lora(trained, rank=2, seed=0)
    with torch.no_grad():
        for name, p in trained.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return trained


def lora_chain(backend, guidance: float) -> BackendChain:
    """The training chain (4 steps, eta 1) on a LoRA'd copy; non-zero B so that every LoRA weight gets a gradient."""
    return BackendChain(with_random_lora(backend, 0.05), mean_brightness,
                        sampler.SamplerSettings(steps=4, eta=1.0, guidance=guidance))


def grad_of(chain: BackendChain, est, seed: int = 0) -> torch.Tensor:
    for p in chain.parameters():
        p.grad = None
    est.accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(seed))
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in chain.parameters()])


def check_full_bp_is_autograd_of_the_unrolled_sde(chain: BackendChain, **model_kwargs) -> None:
    """The estimate against a hand-unrolled Euler-Maruyama chain with the same noise draws
    (``model_kwargs``: what the model call takes besides, e.g. FLUX's embedded guidance)."""
    full = grad_of(chain, FullBackprop(use_checkpoint=False))
    assert torch.isfinite(full).all() and full.norm() > 0
    torch.testing.assert_close(grad_of(chain, FullBackprop()), full)

    backend, sched = chain.backend, chain.schedule
    ctx = chain.context(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    x = backend.initial_noise(len(PROMPTS), gen)
    for k in range(sched.num_steps, 0, -1):
        t, t_prev, s = (float(v[k]) for v in (sched.t, sched.t_prev, sched.noise_coef))
        v = backend.model_output(x, torch.full((len(x),), float(sched.timesteps[k])), ctx.cond.at(k), **model_kwargs)
        drift = v + s**2 / (2 * t) * (x + (1 - t) * v)
        x = x - drift * (t - t_prev) + s * (t - t_prev) ** 0.5 * torch.randn(x.shape, generator=gen)
    loss = -mean_brightness(backend.decode(x), PROMPTS).mean()
    manual = torch.cat([g.flatten() for g in torch.autograd.grad(loss, chain.parameters())])
    assert float((full - manual).norm()) <= 1e-4 * float(manual.norm())


def check_pathwise_estimators_agree(chain: BackendChain) -> None:
    full = grad_of(chain, FullBackprop())
    torch.testing.assert_close(grad_of(chain, TruncatedBackprop(steps=4)), full)
    torch.testing.assert_close(grad_of(chain, RLR(tail=4)), full)  # FO tail = whole chain


def check_finite_gradient(chain: BackendChain, name: str, make) -> None:
    g = grad_of(chain, make())
    assert torch.isfinite(g).all() and g.norm() > 0, name


def check_step_log_prob(chain: BackendChain, guidance: float, against_normal: bool = False) -> None:
    """``step_log_prob`` of each recorded step is the one the rollout recorded (and, with
    ``against_normal``, the Normal log-density around the recorded mean)."""
    ctx = chain.context(PROMPTS)
    traj = chain.rollout(ctx, torch.Generator().manual_seed(1))
    for k in range(1, chain.num_steps + 1):
        with torch.no_grad():
            logp = sampler.step_log_prob(chain.backend, chain.schedule, traj.x[k], traj.x[k - 1], k, ctx.cond,
                                         guidance)
        torch.testing.assert_close(logp, traj.log_prob[k], rtol=1e-5, atol=1e-3)
        if against_normal:
            normal = torch.distributions.Normal(traj.mean[k], chain.sigma[k].expand_as(traj.mean[k]))
            torch.testing.assert_close(logp, normal.log_prob(traj.x[k - 1]).flatten(1).sum(1), rtol=1e-5, atol=1e-3)


def plain(pipe, prompts, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """The plain pipeline's images at the tiny models' native 16x16."""
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images


def check_lora_export_loads_in_a_plain_pipeline(backend, load_pipe: Callable, guidance: float, tmp_path) -> None:
    """A random LoRA's export, loaded into ``load_pipe()``'s fresh plain pipeline, gives our images;
    and the app reads its own export back."""
    trained = with_random_lora(backend, 0.2)
    settings = sampler.SamplerSettings(steps=4, guidance=guidance)
    ours = sampler.generate(trained, ["a red cat"], settings, seed=5)
    base = sampler.generate(backend, ["a red cat"], settings, seed=5)
    assert float((ours - base).abs().max()) > 1e-2  # the LoRA changes the image
    version = lora.write_version(trained, tmp_path / "v1", "lora", {}, {})
    pipe = load_pipe()
    pipe.load_lora_weights(str(version), weight_name=lora.LORA_WEIGHTS)
    assert float((ours - plain(pipe, ["a red cat"], 4, guidance, 5)).abs().max()) <= 1e-4
    again = copy.deepcopy(backend)  # and the app reads its own export back
    lora.apply_version(again, version)
    torch.testing.assert_close(sampler.generate(again, ["a red cat"], settings, seed=5), ours)

