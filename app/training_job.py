"""The app's bridge to ``rlr_core.training``: a round's config in, a version folder and live metrics out.

The reward a round maximises is the reward proxy's ensemble mean minus ``penalty`` times the
ensemble's spread (per sample: an uncertainty-penalised reward, so the round gains nothing by
going where the proxy's heads disagree); the same forward pass gives the spread, which the
Train tab plots as the proxy's uncertainty on the round's own samples (rising uncertainty =
the model is drifting where the proxy has no data). A fidelity term (the backend's judge,
weighted) can be added, so the round keeps the prompt while it raises the proxy. The round stops
early once the penalised reward stops rising (:mod:`app.plateau`), or once the probe fidelity
falls past the threshold (:class:`app.fidelity_guard.FidelityWatch`, which first puts the
adapter back to the last good step); unlike a stop on request, both keep the version.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from app import zerogpu
from app.fidelity_guard import FidelityWatch
from app.plateau import Plateau
from app.worker import JobContext, JobStopped
from rlr_core import training
from rlr_core.backends.base import DiffusionBackend
from rlr_core.training.chunked import run_chunked_round
from rlr_core.training.resume import RoundState
from rlr_core.training.round_process import RoundProcess


@dataclass
class Trained:
    weights_path: Path
    metrics: dict


class ProxyReward:
    """The proxy as a training reward, remembering the ensemble spread of each step's batch.

    With a fidelity judge and ``fidelity_weight`` w > 0 the reward is
    (r - lambda * spread) / s + w * fidelity (:mod:`rlr_core.fidelity`), so the gradient itself
    keeps the prompt; ``scale`` s is 1, or the proxy's spread over the images people judged
    (``normalize_reward``), which puts w (and the KL's beta) in units of the proxy's own spread.
    The first call of a step scores the step's samples; later ones (RLR's state baseline scores
    the model's own x_0 predictions) are not what the plot shows, so only the first is kept."""

    def __init__(self, proxy, penalty: float = 0.0, judge=None, fidelity_weight: float = 0.0, scale: float = 1.0,
                 anchors: frozenset[str] = frozenset(), anchor_weight: float = 0.0):
        if not scale > 0:
            raise ValueError(f"the reward's scale must be positive, got {scale}")
        self.proxy = proxy
        self.penalty = penalty  # lambda in r - lambda * spread
        self.scale = scale  # s in (r - lambda * spread) / s
        self.judge = judge  # also without a weight: the Train tab plots the fidelity of the round's samples
        self.fidelity_weight = fidelity_weight if judge is not None else 0.0
        # Rows whose prompt is one of ``anchors`` (the round's anchor rows, TrainConfig.anchor_rows)
        # are rewarded by w_a * fidelity alone: the rater's taste has no say on prompts they never saw.
        self.anchor_weight = anchor_weight if judge is not None else 0.0
        self.anchors = frozenset(anchors) if self.anchor_weight else frozenset()
        self.last: dict[str, float | None] = {"uncertainty": None, "fidelity": None}
        self._armed = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        heads = self.proxy.head_rewards(images, prompts)  # (n_heads, B)
        reward = heads.mean(0) - self.penalty * heads.std(0) if self.penalty else heads.mean(0)
        reward = reward / self.scale
        anchor = torch.tensor([p in self.anchors for p in prompts], device=reward.device)
        anchored = bool(anchor.any())
        fidelity = None
        if self.judge is not None and (self.fidelity_weight or self._armed or anchored):
            with contextlib.nullcontext() if self.fidelity_weight or self.anchor_weight else torch.no_grad():
                fidelity = self.judge.score(images, prompts).to(reward)
        if self.fidelity_weight:
            reward = reward + self.fidelity_weight * fidelity
        if self._armed:  # the step's own samples, the rows that train the rater's taste
            taste = ~anchor if bool((~anchor).any()) else torch.ones_like(anchor)
            self.last = {"uncertainty": float(heads.detach().std(0)[taste].mean()),
                         "fidelity": None if fidelity is None else float(fidelity.detach()[taste].mean())}
            if anchored:  # the batch mean of the round's reward mixes in the anchor rows
                self.last["taste_reward"] = float(reward.detach()[taste].mean())
            self._armed = False
        return torch.where(anchor, self.anchor_weight * fidelity, reward) if anchored else reward

    def to(self, device: str | torch.device) -> ProxyReward:
        """Move the proxy (with its image encoder) and the judge, e.g. into a GPU worker."""
        self.proxy.to(device)
        if self.judge is not None:
            self.judge.to(device)
        return self

    def observe(self) -> dict[str, float | None]:
        """The step's spread and fidelity, read once after each step (also in a ZeroGPU worker);
        re-arms for the next."""
        self._armed = True
        return dict(self.last)

    def restore(self, observed: dict[str, float | None] | None) -> None:
        """What a ZeroGPU worker observed for a step, back in this process."""
        if observed is not None:
            self.last = dict(observed)

    def proxy_reward(self, batch_mean: float, observed: dict[str, float | None]) -> float:
        """The proxy's own reward back from the batch mean of the round's reward (the batch mean of
        (r - lambda * spread_i) / s + w * f_i is (mean(r) - lambda * mean(spread)) / s + w * mean(f));
        with anchor rows in the batch, from the mean over the other rows, which ``observed`` carries."""
        penalised = batch_mean if observed.get("taste_reward") is None else observed["taste_reward"]
        if observed.get("fidelity") is not None:
            penalised -= self.fidelity_weight * observed["fidelity"]
        raw = penalised * self.scale
        if observed.get("uncertainty") is not None:
            raw += self.penalty * observed["uncertainty"]
        return raw


def train_lora(backend: DiffusionBackend, proxy, config: training.TrainConfig, out_dir: Path, ctx: JobContext,
               on_progress: Callable[[float], None], penalty: float = 0.0, patience: int = 0,
               judge=None, fidelity_weight: float = 0.0, reward_scale: float = 1.0, anchor_weight: float = 0.0,
               watch: Callable[[], FidelityWatch | None] | None = None,
               process: RoundProcess | None = None) -> Trained:
    """Fine-tune ``backend`` (a private copy) in place with ``config``; write the version folder ``out_dir``.
    ``penalty``: lambda of the penalised reward; ``patience``: steps without a new best (smoothed)
    penalised reward before the round stops early (0: never); ``judge`` and ``fidelity_weight``:
    the fidelity term of the reward; ``reward_scale``: s, the proxy's reward divided by it;
    ``anchor_weight``: w_a, the reward of the round's anchor rows (``config.anchor_rows``) per unit of fidelity;
    ``watch``: makes the in-round fidelity check (:class:`app.fidelity_guard.FidelityWatch`) once
    the adapter exists (not on ZeroGPU, where the weights live in the GPU worker between steps);
    ``process``: train in that process (:mod:`rlr_core.training.round_process`), the watch
    checking the weights between its chunks."""
    if judge is None or not anchor_weight:  # anchor rows are rewarded by the judge alone: none without one
        config = dataclasses.replace(config, anchor_rows=0)
    reward = ProxyReward(proxy, penalty, judge, fidelity_weight, reward_scale,
                         frozenset(training.anchor_pool(backend, config)), anchor_weight)
    plateau = Plateau(patience)
    chunked = zerogpu.chunked_training()
    if config.finetune == "lora":
        training.trainable_parameters(backend, config)  # the adapter the round trains (the watch snapshots it)
    watcher = watch() if watch is not None and not chunked else None

    def rolled_back() -> str:
        return (f" · probe fidelity fell to {watcher.last:.3f} from {watcher.reference:.3f}: back to step "
                f"{watcher.good_step}, ending the round")

    def progress(p: training.Progress) -> bool:
        observed = reward.observe()
        raw = reward.proxy_reward(p.reward_mean, observed)
        ctx.log_step(step=p.step, reward=raw, penalised=p.reward_mean, uncertainty=observed["uncertainty"],
                     fidelity=observed["fidelity"], reward_std=p.reward_std, grad_norm=p.grad_norm)
        plateaued = plateau.update(p.step, p.reward_mean)
        # in a round process the weights here are the chunk's last, so the watch checks between chunks
        unfaithful = watcher is not None and process is None and watcher.check(p.step)
        note = (" · the penalised reward stopped rising: ending the round" if plateaued else
                rolled_back() if unfaithful else "")
        ctx.report(message=f"step {p.step}/{p.total} · proxy reward {raw:.3f} · round reward "
                           f"{p.reward_mean:.3f} · {p.elapsed:.0f} s" + note)
        on_progress(p.step / p.total)
        return ctx.stopped or plateaued or unfaithful

    def check_between_chunks(state: RoundState) -> bool:
        """The watch on the weights the round process reached; a roll-back goes into the state."""
        if watcher is None:
            return False
        params = training.trainable_parameters(backend, config)
        with torch.no_grad():
            for p, value in zip(params, state.params):
                p.copy_(value)
        if not watcher.check(state.step):
            return False
        state.params = [p.detach().cpu().clone() for p in params]
        ctx.report(message=f"step {state.step}/{config.steps}" + rolled_back())
        return True

    if chunked:  # a ZeroGPU Space: the round as GPU calls of a bounded duration
        result = zerogpu.run_round(backend, reward, config, out_dir, progress, ctx.stop_event, observe=reward.observe,
                                   on_observed=reward.restore)
    elif process is not None:  # the steps in their own process, one per chunk: stop, progress and watch between
        every = watcher.every if watcher is not None and watcher.active else 0
        result = run_chunked_round(backend, reward, config, out_dir, progress, ctx.stop_event,
                                   call=process.chunk_call(), on_observed=reward.restore, check_every=every,
                                   on_check=check_between_chunks, chunk_steps=1)
    else:
        result = training.run_round(backend, reward, config, out_dir, progress=progress, stop=ctx.stop_event)
    early = plateau.stopped_at is not None or (watcher is not None and watcher.stopped_at is not None)
    if ctx.stopped or result.version is None or (result.stopped and not early):
        raise JobStopped()
    metrics = {k: v for k, v in result.metrics.items() if k != "history"}
    metrics.update(uncertainty_penalty=penalty, patience=patience, plateau_stopped_at=plateau.stopped_at,
                   best_penalised_step=plateau.best_step, fidelity_weight=reward.fidelity_weight,
                   reward_scale=reward.scale, anchor_fidelity=reward.anchor_weight if reward.anchors else 0.0,
                   **(watcher.metrics() if watcher is not None else {}))
    return Trained(result.version, metrics)
