"""Stable Diffusion 3 (a tiny one built from configs, tests/tiny_flow.py) behind the backend
interface: generation is the plain pipeline's ODE, training runs the SDE, every estimator's
gradient is finite, full BP is autograd of the unrolled SDE, and the LoRA export loads in a
fresh plain pipeline (method doc section 10)."""

from __future__ import annotations

import pytest

from rlr_core import sampler
from rlr_core.backends.flow_models import SD3Backend
from rlr_core.estimators import DDPO, LikelihoodRatio
from rlr_core.estimators.backend_chain import BackendChain
from rlr_core.flow import FlowSchedule
from tests.flow_backend_checks import (
    ESTIMATORS,
    PROMPTS,
    check_finite_gradient,
    check_full_bp_is_autograd_of_the_unrolled_sde,
    check_lora_export_loads_in_a_plain_pipeline,
    check_pathwise_estimators_agree,
    check_step_log_prob,
    grad_of,
    lora_chain,
    plain,
)
from tests.tiny_flow import load_tiny_sd3, save_tiny_sd3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def backend(folder) -> SD3Backend:
    return SD3Backend.from_pipeline(load_tiny_sd3(folder), name="tiny-sd3")


@pytest.fixture(scope="module")
def chain(backend: SD3Backend) -> BackendChain:
    return lora_chain(backend, guidance=1.0)


def test_generation_is_the_plain_pipelines_ode(backend: SD3Backend, folder) -> None:
    sched = sampler.schedule_for(backend, 4, 1.0)
    assert isinstance(sched, FlowSchedule) and float(sched.sigma.abs().max()) == 0
    train = sampler.schedule_for(backend, 4, 1.0, training=True)
    assert float(train.sigma[1:].min()) > 0 and train.noise_level == pytest.approx(0.7)
    pipe = load_tiny_sd3(folder)
    for guidance in (1.0, 3.0):
        ours = sampler.generate(backend, PROMPTS, sampler.SamplerSettings(steps=4, guidance=guidance), seed=3)
        assert float((ours - plain(pipe, PROMPTS, 4, guidance, 3)).abs().max()) <= 1e-5


def test_the_chain_trains_on_the_sde(chain: BackendChain) -> None:
    assert isinstance(chain.schedule, FlowSchedule) and float(chain.sigma[1:].min()) > 0
    names = [n for n, _ in chain.named_parameters()]
    assert names and all("lora_" in n for n in names)


def test_full_bp_is_autograd_of_the_unrolled_sde(chain: BackendChain) -> None:
    """The estimate against a hand-unrolled Euler-Maruyama chain with the same noise draws."""
    check_full_bp_is_autograd_of_the_unrolled_sde(chain)


def test_pathwise_estimators_agree_where_they_must(chain: BackendChain) -> None:
    check_pathwise_estimators_agree(chain)


@pytest.mark.parametrize("name,make", ESTIMATORS)
def test_every_estimator_gives_a_finite_gradient(chain: BackendChain, name: str, make) -> None:
    check_finite_gradient(chain, name, make)


def test_ddpo_first_step_is_lr(chain: BackendChain) -> None:
    lr = grad_of(chain, LikelihoodRatio(chunk=16))
    assert float((grad_of(chain, DDPO(chunk=3)) - lr).norm()) <= 1e-3 * float(lr.norm())


def test_step_log_prob_is_the_recorded_one(chain: BackendChain) -> None:
    check_step_log_prob(chain, 1.0, against_normal=True)


def test_lora_export_loads_in_a_plain_pipeline(backend: SD3Backend, folder, tmp_path) -> None:
    check_lora_export_loads_in_a_plain_pipeline(backend, lambda: load_tiny_sd3(folder), 3.0, tmp_path)


def test_load_backend_serves_an_sd3_folder(folder) -> None:
    from rlr_core.backends.loading import load_backend

    loaded = load_backend(str(folder), "cpu", "fp32")
    assert isinstance(loaded, SD3Backend) and loaded.family == "stable-diffusion-3"
    assert loaded.image_size == (16, 16)
