"""The app's bridge to ``rlr_core.training``: a round's config in, a version folder and live metrics out.

The reward a round maximises is the reward proxy's ensemble mean minus ``penalty`` times the
ensemble's spread (per sample: an uncertainty-penalised reward, so the round gains nothing by
going where the proxy's heads disagree); the same forward pass gives the spread, which the
Train tab plots as the proxy's uncertainty on the round's own samples (rising uncertainty =
the model is drifting where the proxy has no data). The round stops early once the penalised
reward stops rising (:mod:`app.plateau`); unlike a stop on request, that keeps the version.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from app import zerogpu
from app.plateau import Plateau
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

    def __init__(self, proxy, penalty: float = 0.0):
        self.proxy = proxy
        self.penalty = penalty  # lambda in r - lambda * spread
        self.last_uncertainty: float | None = None
        self._armed = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        heads = self.proxy.head_rewards(images, prompts)  # (n_heads, B)
        if self._armed:
            self.last_uncertainty = float(heads.detach().std(0).mean())
            self._armed = False
        if not self.penalty:
            return heads.mean(0)
        return heads.mean(0) - self.penalty * heads.std(0)

    def observe(self) -> float | None:
        """The step's spread, read once after each step (also in a ZeroGPU worker); re-arms for the next."""
        self._armed = True
        return self.last_uncertainty


def train_lora(backend: DiffusionBackend, proxy, config: training.TrainConfig, out_dir: Path, ctx: JobContext,
               on_progress: Callable[[float], None], penalty: float = 0.0, patience: int = 0) -> Trained:
    """Fine-tune ``backend`` (a private copy) in place with ``config``; write the version folder ``out_dir``.
    ``penalty``: lambda of the penalised reward; ``patience``: steps without a new best (smoothed)
    penalised reward before the round stops early (0: never)."""
    reward = ProxyReward(proxy, penalty)
    plateau = Plateau(patience)

    def progress(p: training.Progress) -> bool:
        spread = reward.observe()
        # The batch mean of r - lambda * spread_i is mean(r) - lambda * mean(spread_i): the proxy's
        # own reward back from the penalised one (also in a ZeroGPU worker, which sends only the spread).
        raw = p.reward_mean + penalty * spread if spread is not None else p.reward_mean
        ctx.log_step(step=p.step, reward=raw, penalised=p.reward_mean, uncertainty=spread,
                     reward_std=p.reward_std, grad_norm=p.grad_norm)
        plateaued = plateau.update(p.step, p.reward_mean)
        ctx.report(message=f"step {p.step}/{p.total} · proxy reward {raw:.3f} · penalised "
                           f"{p.reward_mean:.3f} · {p.elapsed:.0f} s"
                           + (" · the penalised reward stopped rising: ending the round" if plateaued else ""))
        on_progress(p.step / p.total)
        return ctx.stopped or plateaued

    if zerogpu.chunked_training():  # a ZeroGPU Space: the round as GPU calls of a bounded duration
        result = zerogpu.run_round(backend, reward, config, out_dir, progress, ctx.stop_event, observe=reward.observe,
                                   on_observed=lambda u: setattr(reward, "last_uncertainty", u))
    else:
        result = training.run_round(backend, reward, config, out_dir, progress=progress, stop=ctx.stop_event)
    if ctx.stopped or result.version is None or (result.stopped and plateau.stopped_at is None):
        raise JobStopped()
    metrics = {k: v for k, v in result.metrics.items() if k != "history"}
    metrics.update(uncertainty_penalty=penalty, patience=patience, plateau_stopped_at=plateau.stopped_at,
                   best_penalised_step=plateau.best_step)
    return Trained(result.version, metrics)
