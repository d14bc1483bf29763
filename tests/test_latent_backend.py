"""Everything runs on latent backends too: a tiny random Stable-Diffusion-like pipeline (VAE decode
between x_0 and the reward), loaded by path, sampled with a record, trained with RLR."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlr_core.backends.latent import DiffusersLatentBackend
from rlr_core.estimators import RLR
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.sampler import SamplerSettings, prompt_conditioning, sample
from rlr_core.training import TrainConfig, lora, run_round
from tests.tiny_sd import tiny_pipeline, tiny_tokenizer

PROMPTS = ["a red cat", "a blue dog"]
SETTINGS = SamplerSettings(steps=4, eta=1.0, guidance=2.0)


def redness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A simple differentiable reward on decoded images: red minus the other channels."""
    return (images[:, 0] - 0.5 * (images[:, 1] + images[:, 2])).mean(dim=(1, 2))


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> DiffusersLatentBackend:
    folder: Path = tmp_path_factory.mktemp("pipe") / "tiny-sd"
    tiny_pipeline().save_pretrained(folder)
    return DiffusersLatentBackend.from_pretrained(folder)


def test_tokenizer_is_not_degenerate() -> None:
    ids = tiny_tokenizer()("a red cat").input_ids
    assert len(set(ids)) > 3  # a broken tokenizer maps every word to the end token


def test_sampler_records_a_latent_trajectory(backend: DiffusersLatentBackend) -> None:
    assert backend.state_shape == (4, 8, 8)
    cond = prompt_conditioning(backend, PROMPTS, SETTINGS.steps, guidance=SETTINGS.guidance)
    res = sample(backend, cond, SETTINGS, torch.Generator().manual_seed(0), record=True)
    tr = res.trajectory
    assert tr.x.shape == (5, 2, 4, 8, 8)
    assert (tr.sigma[1:] > 0).all()  # set_alpha_to_one False: every step is stochastic
    torch.testing.assert_close(tr.x[0], tr.mean[1] + tr.sigma[1] * tr.noise[1])
    images = backend.decode(res.x0)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_rlr_and_a_training_step_on_the_latent_backend(backend: DiffusersLatentBackend, tmp_path: Path) -> None:
    params = lora.add_lora(backend, rank=2, seed=0)
    with torch.no_grad():
        for p in params[1::2]:  # lora_B: non-zero so every adapter weight has a gradient
            p.normal_(0, 0.01)
    chain = BackendChain(backend, redness, SETTINGS)
    est = RLR(block=2, rest="lr").accumulate(chain, chain.context(PROMPTS), torch.Generator().manual_seed(0))
    assert est.stats["tail"] >= 1 and torch.isfinite(est.rewards).all()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(float(g.norm()) for g in grads) > 0
    for p in params:
        p.grad = None
    before = [p.detach().clone() for p in params]
    result = run_round(backend, redness, TrainConfig(estimator="rlr", steps=1, batch=2, prompts=PROMPTS,
                                                     sampler=SETTINGS, lr=1e-2), tmp_path / "v1")
    assert result.metrics["steps_done"] == 1 and (result.version / "pytorch_lora_weights.safetensors").exists()
    assert any(not torch.equal(p, b) for p, b in zip(lora.lora_parameters(backend), before))
