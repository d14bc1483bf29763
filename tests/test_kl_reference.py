"""What the round's KL measures against (``kl_reference``): the round's parent, or the base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.errors import AppError
from app.round_config import RoundConfig
from rlr_core import rewards
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld.perception import PerceptionNet
from rlr_core.training import EstimatorConfig, TrainConfig, lora, run_round

FAST = SamplerSettings(steps=4, eta=1.0, guidance=1.0)


def _parent_off_the_base() -> BuiltinBackend:
    """A backend whose adapter (the parent a round continues) is already some way off the base."""
    backend = BuiltinBackend(builtin_model.new_model(seed=0))
    lora.add_lora(backend, rank=2, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backend.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return backend


def _first_step_kl(reference: str, tmp_path: Path) -> float:
    reward_fn = rewards.make_reward("prefer-large", PerceptionNet().eval().requires_grad_(False))
    config = TrainConfig(estimator=EstimatorConfig("truncated-bp", {"steps": 1, "kl_coef": 1.0}), steps=1, batch=2,
                         prompts=["a circle"], sampler=FAST, lr=1e-3, seed=0, kl_reference=reference)
    assert TrainConfig.from_dict(config.to_dict()).kl_reference == reference
    result = run_round(_parent_off_the_base(), reward_fn, config, tmp_path / reference)
    return result.metrics["history"][0]["kl"]


def test_the_kl_to_the_parent_starts_at_zero_and_the_kl_to_the_base_charges_earlier_rounds(tmp_path: Path) -> None:
    # the first step's KL is taken before the optimiser moves anything: the weights are the parent's
    assert _first_step_kl("parent", tmp_path) == 0.0
    assert _first_step_kl("base", tmp_path) > 0.0


def test_kl_reference_is_a_checked_round_setting() -> None:
    assert RoundConfig.parse({}).training.kl_reference == RoundConfig.parse({}).public()["kl_reference"] == "parent"
    config = RoundConfig.parse({"kl_reference": "base"})
    assert config.training.kl_reference == "base" and config.public()["kl_reference"] == "base"
    assert config.for_round(["a circle"], None, 3, (0.4, 0.75), None).kl_reference == "base"
    for bad in ("grandparent", 1, ["base"]):
        with pytest.raises(AppError, match="KL reference"):
            RoundConfig.parse({"kl_reference": bad})
