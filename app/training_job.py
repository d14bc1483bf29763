"""The app's bridge to ``rlr_core.training``: a round's config in, a version folder and live metrics out.

The reward a round maximises is the reward proxy's ensemble mean; the same forward pass gives
the ensemble's spread, which the Train tab plots as the proxy's uncertainty on the round's
own samples (rising uncertainty = the model is drifting where the proxy has no data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from app import zerogpu
from app.worker import JobContext, JobStopped
from rlr_core import training
from rlr_core.backends.base import DiffusionBackend


@dataclass
class Trained:
    weights_path: Path
    metrics: dict


class ProxyReward:
    """The proxy as a training reward, remembering the ensemble spread of each step's batch.

    The first call of a step scores the step's samples; later ones (RLR's state baseline scores
    the model's own x_0 predictions) are not what the plot shows, so only the first is kept."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.last_uncertainty: float | None = None
        self._armed = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        heads = self.proxy.head_rewards(images, prompts)  # (n_heads, B)
        if self._armed:
            self.last_uncertainty = float(heads.detach().std(0).mean())
            self._armed = False
        return heads.mean(0)

    def observe(self) -> float | None:
        """The step's spread, read once after each step (also in a ZeroGPU worker); re-arms for the next."""
        self._armed = True
        return self.last_uncertainty


def train_lora(backend: DiffusionBackend, proxy, config: training.TrainConfig, out_dir: Path, ctx: JobContext,
               on_progress: Callable[[float], None]) -> Trained:
    """Fine-tune ``backend`` (a private copy) in place with ``config``; write the version folder ``out_dir``."""
    reward = ProxyReward(proxy)

    def progress(p: training.Progress) -> bool:
        ctx.log_step(step=p.step, reward=p.reward_mean, uncertainty=reward.observe(),
                     reward_std=p.reward_std, grad_norm=p.grad_norm)
        ctx.report(message=f"step {p.step}/{p.total} · proxy reward {p.reward_mean:.3f} · "
                           f"{p.elapsed:.0f} s")
        on_progress(p.step / p.total)
        return ctx.stopped

    if zerogpu.chunked_training():  # a ZeroGPU Space: the round as GPU calls of a bounded duration
        result = zerogpu.run_round(backend, reward, config, out_dir, progress, ctx.stop_event, observe=reward.observe,
                                   on_observed=lambda u: setattr(reward, "last_uncertainty", u))
    else:
        result = training.run_round(backend, reward, config, out_dir, progress=progress, stop=ctx.stop_event)
    if result.stopped or result.version is None:
        raise JobStopped()
    metrics = {k: v for k, v in result.metrics.items() if k != "history"}
    return Trained(result.version, metrics)
