"""A round split into short calls (ZeroGPU leases) trains exactly the adapter of an unchunked round."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlr_core import rewards
from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.sampler import SamplerSettings
from rlr_core.shapesworld import model as builtin_model
from rlr_core.shapesworld.perception import PerceptionNet
from rlr_core.training import EstimatorConfig, TrainConfig, lora, run_round
from rlr_core.training.chunked import ChunkOutcome, run_chunk, run_chunked_round
from rlr_core.training.devices import move_to

FAST = SamplerSettings(steps=3, eta=1.0, guidance=1.0)
PROMPTS = ["a red circle", "a blue square"]
TINY = 1e-6  # seconds per chunk: every chunk pauses after its first step


def fresh_backend() -> BuiltinBackend:
    return BuiltinBackend(builtin_model.new_model(seed=0))


class RedReward:
    """A picklable reward (a ZeroGPU worker receives it pickled) that records a side statistic."""

    def __init__(self):
        torch.manual_seed(1)
        self.fn = rewards.make_reward("prefer-colour:red", PerceptionNet().eval().requires_grad_(False))
        self.last_mean: float | None = None
        self.armed = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r = self.fn(images, prompts)
        if self.armed:  # the step's own samples (later calls score RLR's state baseline), as ProxyReward
            self.last_mean = float(r.detach().mean())
            self.armed = False
        return r

    def __getstate__(self) -> dict:  # make_reward returns closures: rebuild them on unpickling
        return {"last_mean": self.last_mean, "armed": self.armed}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.last_mean, self.armed = state["last_mean"], state["armed"]

    def observe(self) -> float | None:
        self.armed = True
        return self.last_mean


def config(estimator: str = "rlr", steps: int = 4) -> TrainConfig:
    options = {"block": 1} if estimator == "rlr" else {"inner_epochs": 2}
    return TrainConfig(estimator=EstimatorConfig(estimator, options), steps=steps, batch=2, prompts=PROMPTS,
                       sampler=FAST, lr=1e-2, seed=3)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / lora.LORA_WEIGHTS)


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def across_a_process_boundary(*args) -> ChunkOutcome:
    """What a ZeroGPU worker sees: pickled arguments in, a pickled result out."""
    outcome = run_chunk(*pickle.loads(pickle.dumps(args)))
    assert all(p.device.type == "cpu" for p in outcome.result.state.params) if outcome.result.state else True
    return pickle.loads(pickle.dumps(outcome))


@pytest.mark.parametrize("estimator", ["rlr", "ddpo"])
def test_chunked_round_matches_an_unchunked_round(tmp_path: Path, estimator: str) -> None:
    whole = run_round(fresh_backend(), RedReward(), config(estimator), tmp_path / "whole")
    seen, observed = [], []
    reward = RedReward()
    chunked = run_chunked_round(fresh_backend(), reward, config(estimator), tmp_path / "chunked",
                                progress=seen.append, chunk_seconds=TINY, call=across_a_process_boundary,
                                observe=reward.observe, on_observed=observed.append)
    assert chunked.metrics["chunks"] == 4  # one step per call
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert_same_adapter(whole.version, chunked.version)
    rows = lambda r: [(h["reward_mean"], h["loss"], h["grad_norm"]) for h in r.metrics["history"]]
    assert rows(whole) == rows(chunked)
    assert len(observed) == 4 and all(isinstance(v, float) for v in observed)
    if estimator == "rlr":  # one reward call per step (DDPO's inner epochs call it again)
        assert observed == [h["reward_mean"] for h in chunked.metrics["history"]]
    assert chunked.metrics["steps_done"] == 4 and not chunked.stopped


def test_a_budget_pauses_and_resume_continues(tmp_path: Path) -> None:
    backend = fresh_backend()
    first = run_round(backend, RedReward(), config(), tmp_path / "v", budget_s=TINY)
    assert first.version is None and first.state is not None and first.state.step == 1
    assert not (tmp_path / "v").exists()  # nothing written until the round ends
    second = run_round(fresh_backend(), RedReward(), config(), tmp_path / "v", resume=first.state, budget_s=1e9)
    assert second.state is None and second.metrics["steps_done"] == 4
    whole = run_round(fresh_backend(), RedReward(), config(), tmp_path / "whole")
    assert_same_adapter(whole.version, second.version)


def test_a_generous_chunk_runs_the_round_in_one_call(tmp_path: Path) -> None:
    result = run_chunked_round(fresh_backend(), RedReward(), config(steps=2), tmp_path / "v", chunk_seconds=3600)
    assert result.metrics["chunks"] == 1 and result.metrics["steps_done"] == 2


def test_stopping_between_chunks_keeps_what_was_trained(tmp_path: Path) -> None:
    stop_after_two = lambda p: p.step >= 2
    result = run_chunked_round(fresh_backend(), RedReward(), config(), tmp_path / "v", progress=stop_after_two,
                               chunk_seconds=TINY, call=across_a_process_boundary)
    assert result.stopped and result.metrics["steps_done"] == 2 and result.metrics["chunks"] == 2
    two = run_round(fresh_backend(), RedReward(), config(steps=4), tmp_path / "two",
                    progress=stop_after_two)
    assert_same_adapter(two.version, result.version)


def test_resume_refuses_a_state_of_another_model(tmp_path: Path) -> None:
    paused = run_round(fresh_backend(), RedReward(), config(), tmp_path / "v", budget_s=TINY)
    other = TrainConfig(**{**config().to_dict(), "sampler": FAST, "lora_rank": 2})
    with pytest.raises(ValueError, match="does not fit"):
        run_round(fresh_backend(), RedReward(), other, tmp_path / "v", resume=paused.state)


def test_spaces_gpu_decorator_wraps_a_chunk_off_spaces(tmp_path: Path) -> None:
    spaces = pytest.importorskip("spaces")
    gpu_chunk = spaces.GPU(duration=1)(run_chunk)  # a no-op off a ZeroGPU Space
    result = run_chunked_round(fresh_backend(), RedReward(), config(steps=2), tmp_path / "v",
                               chunk_seconds=TINY, call=gpu_chunk, device="auto")
    assert result.metrics["chunks"] == 2 and result.version is not None


def test_move_to_moves_a_backend_with_all_its_modules() -> None:
    backend = fresh_backend()
    move_to({"backend": backend}, "meta")
    assert backend.device.type == "meta"
    assert all(p.device.type == "meta" for p in backend.model.text_encoder.parameters())


def test_move_to_moves_the_reward_proxy_with_its_image_encoder() -> None:
    from app.training_job import ProxyReward
    from rlr_core.feedback.encoders import PerceptionImageEncoder
    from rlr_core.feedback.prompt_encoders import BagOfWordsPromptEncoder
    from rlr_core.feedback.reward_proxy import RewardProxy

    proxy = RewardProxy(PerceptionImageEncoder(PerceptionNet()), BagOfWordsPromptEncoder())
    move_to(ProxyReward(proxy), "meta")
    assert all(p.device.type == "meta" for p in proxy.parameters())
    assert all(p.device.type == "meta" for p in proxy.image_encoder.model.parameters())
