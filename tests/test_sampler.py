"""The sampler's step math against diffusers, its trajectory record, guidance and DCoT schedules."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.sampler import (
    Conditioning,
    SamplerSettings,
    ddim_mean,
    gaussian_log_prob,
    generate,
    make_schedule,
    prompt_conditioning,
    sample,
    step_log_prob,
    step_mean,
)
from rlr_core.shapesworld import model as builtin_model
from tests.oracles import diffusers_loop

PROMPTS = ["a red circle", "a small blue square on the left"]


@pytest.fixture(scope="module")
def backend() -> BuiltinBackend:
    return BuiltinBackend(builtin_model.new_model(seed=0))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_matches_diffusers(prediction_type: str, eta: float) -> None:
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                              clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    steps = 10
    sched = make_schedule(scheduler, steps, eta)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=gen) * 1.5
    scheduler.set_timesteps(steps)
    for k, t in zip(range(steps, 0, -1), scheduler.timesteps):
        out = torch.randn(x.shape, generator=gen) * 2  # big enough that clip_sample bites
        noise = torch.randn(x.shape, generator=gen)
        want = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        assert sched.timesteps[k] == t
        mu = ddim_mean(out, x, sched.alpha_prod[k], sched.alpha_prod_prev[k], sched.sigma[k],
                       prediction_type, sched.clip_range)
        torch.testing.assert_close(mu + sched.sigma[k] * noise, want, rtol=1e-5, atol=1e-5)
        var = scheduler._get_variance(t, t - scheduler.config.num_train_timesteps // steps)
        torch.testing.assert_close(sched.sigma[k], eta * var.sqrt())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_sample_steps_match_one_step_at_a_time(prediction_type: str) -> None:
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type,
                              clip_sample=True, set_alpha_to_one=True, timestep_spacing="trailing")
    sched = make_schedule(scheduler, 6, 1.0)
    gen = torch.Generator().manual_seed(1)
    x, out = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    ks = torch.tensor([6, 3, 1, 2])
    batched = ddim_mean(out, x, sched.alpha_prod[ks], sched.alpha_prod_prev[ks], sched.sigma[ks],
                        prediction_type, sched.clip_range)
    for b, k in enumerate(ks.tolist()):
        one = ddim_mean(out[b:b + 1], x[b:b + 1], sched.alpha_prod[k], sched.alpha_prod_prev[k],
                        sched.sigma[k], prediction_type, sched.clip_range)
        torch.testing.assert_close(batched[b:b + 1], one)


def test_sampling_without_record_equals_the_plain_diffusers_loop(backend: BuiltinBackend) -> None:
    settings = SamplerSettings(steps=4, eta=1.0, guidance=3.0)
    calls = []
    hook = backend.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        want = diffusers_loop.generate(backend.model, PROMPTS, steps=4, guidance=3.0, eta=1.0, seed=7)
        n_plain = len(calls)
        cond = prompt_conditioning(backend, PROMPTS, 4, guidance=3.0)
        got = sample(backend, cond, settings, torch.Generator().manual_seed(7)).x0
    finally:
        hook.remove()
    torch.testing.assert_close(backend.decode(got), want, rtol=1e-5, atol=1e-5)
    assert len(calls) - n_plain == n_plain == 4  # one (guided, batched) denoiser call per step


def test_record_is_consistent(backend: BuiltinBackend) -> None:
    settings = SamplerSettings(steps=4, eta=0.8, guidance=1.0)
    cond = prompt_conditioning(backend, PROMPTS, 4)
    res = sample(backend, cond, settings, torch.Generator().manual_seed(0), record=True)
    tr = res.trajectory
    assert tr.x.shape == (5, 2, 3, 32, 32) and torch.equal(tr.x0, res.x0)
    sched = make_schedule(backend.scheduler, 4, 0.8)
    for k in range(1, 5):
        torch.testing.assert_close(tr.x[k - 1], tr.mean[k] + tr.sigma[k] * tr.noise[k])
        if tr.sigma[k] > 0:
            torch.testing.assert_close(tr.log_prob[k], gaussian_log_prob(tr.x[k - 1], tr.mean[k], tr.sigma[k]))
    # Recomputing a step's mean (differentiably, per-sample steps) reproduces the record.
    ks = torch.tensor([4, 2])
    mu = step_mean(backend, sched, tr.x[ks, torch.arange(2)], ks, cond, 1.0)
    torch.testing.assert_close(mu, tr.mean[ks, torch.arange(2)], rtol=1e-4, atol=1e-5)
    logp = step_log_prob(backend, sched, tr.x[3], tr.x[2], 3, cond, 1.0)
    torch.testing.assert_close(logp.detach(), tr.log_prob[3], rtol=1e-4, atol=1e-3)
    logp.sum().backward()
    assert backend.denoiser.conv_in.weight.grad.abs().sum() > 0
    backend.denoiser.zero_grad(set_to_none=True)


def test_log_prob_is_undefined_at_a_deterministic_step(backend: BuiltinBackend) -> None:
    sched = make_schedule(backend.scheduler, 4, 1.0)
    cond = prompt_conditioning(backend, PROMPTS, 4)
    assert sched.sigma[1] == 0
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob(backend, sched, x, x, 1, cond, 1.0)


def test_per_step_conditioning(backend: BuiltinBackend) -> None:
    settings = SamplerSettings(steps=4, eta=1.0, guidance=1.0)
    red = backend.encode_prompts(["a red circle"] * 2)
    blue = backend.encode_prompts(["a blue square"] * 2)

    def run(cond: Conditioning) -> torch.Tensor:
        return sample(backend, cond, settings, torch.Generator().manual_seed(0)).x0

    constant = run(Conditioning(red, 4))
    torch.testing.assert_close(run(Conditioning([red] * 4, 4)), constant)
    torch.testing.assert_close(run(Conditioning(lambda k: red, 4)), constant)
    # Switching the prompt only for the last step (k = 1) changes the image.
    switched_list = run(Conditioning([red, red, red, blue], 4))
    switched_fn = run(Conditioning(lambda k: blue if k == 1 else red, 4))
    torch.testing.assert_close(switched_list, switched_fn)
    assert not torch.allclose(switched_list, constant)
    # DCoT stages: coarse, mid, fine prompt lists.
    stages = prompt_conditioning(backend, ["x"] * 2, 4, stage_prompts=[["a red circle"] * 2] * 3)
    torch.testing.assert_close(run(stages), constant)


def test_dcot_schedule_matches_the_staged_preview_sampler(backend: BuiltinBackend) -> None:
    from rlr_core import dcot

    stages = dcot.split_prompt("a large red circle on the left, black background")
    per_step = dcot.step_prompts(stages, 4)
    want, _ = dcot.sample_staged(backend, [[p] * 2 for p in per_step], seed=3, guidance=3.0, eta=1.0)
    cond = prompt_conditioning(backend, [stages.fine] * 2, 4, [[s] * 2 for s in stages.as_list()], 3.0,
                               stages=dcot.stage_of_steps(4))
    got = sample(backend, cond, SamplerSettings(4, 1.0, 3.0), torch.Generator().manual_seed(3)).x0
    torch.testing.assert_close(backend.decode(got), want, rtol=1e-5, atol=1e-5)


def test_schedules_leave_the_backends_scheduler_alone(backend: BuiltinBackend) -> None:
    scheduler = backend.scheduler
    before = (scheduler.num_inference_steps, scheduler.timesteps.clone())
    first = make_schedule(scheduler, 7, 1.0)
    make_schedule(scheduler, 3, 0.5)
    assert scheduler.num_inference_steps == before[0] and torch.equal(scheduler.timesteps, before[1])
    assert make_schedule(scheduler, 7, 1.0) is first  # computed once per (config, steps, eta)
    other = DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon")
    assert make_schedule(other, 7, 1.0) is not first  # another config, another table


def test_concurrent_sampling_on_one_backend_gives_the_serial_images(backend: BuiltinBackend) -> None:
    # No lock around sampling: runs of different lengths interleave on one backend.
    from concurrent.futures import ThreadPoolExecutor

    def draw(steps: int) -> torch.Tensor:
        return generate(backend, PROMPTS[:1], SamplerSettings(steps=steps, guidance=2.0), seed=steps)

    jobs = [2, 3, 5] * 3
    serial = {steps: draw(steps) for steps in set(jobs)}
    with ThreadPoolExecutor(3) as pool:
        for steps, image in zip(jobs, pool.map(draw, jobs)):
            torch.testing.assert_close(image, serial[steps], rtol=0, atol=1e-6)


def test_per_row_seeds_draw_each_run_as_if_alone(builtin_backend) -> None:
    from rlr_core.sampler import SamplerSettings, generate, generate_per_row_seeds

    settings = SamplerSettings(steps=4, guidance=3.0)  # eta = 1: a fresh draw at every step
    prompts = ["a red circle", "a red circle", "a blue square", "a small green triangle on the left"]
    together = generate_per_row_seeds(builtin_backend, prompts, settings, [5, 5, 9, 7])
    alone = [generate(builtin_backend, prompts[:2], settings, seed=5),
             generate(builtin_backend, prompts[2:3], settings, 9), generate(builtin_backend, prompts[3:], settings, 7)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-5)
