"""Training rounds as the app runs them, in the background worker.

One round:
1. fit the reward proxy to every rating and comparison in the store (its held-out accuracy is
   shown; it also drives the comparison tab's active selection from then on);
2. collect the prompts people used and edited, with their prompt-lab stage prompts;
3. fine-tune a LoRA adapter on a private copy of the active version (``rlr_core.training``);
4. save it as a new model version, draw its samples into the rating queue, and draw blind
   before/after pairs (same prompts and seed through the parent) into the comparison queue;
5. finish the round in the store, and only then make the new version active.

A crash anywhere before step 5 leaves the round "running" in the store; the next start marks
it failed, and the active version is still the last good one (see ``app/state.py``).
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import round_files
from app import validate as check
from app.errors import AppError
from app.generation import GenerationSettings, draw, store_images
from app.prompts import RoundPrompt, round_prompts
from app.worker import JobContext, JobStatus, WorkerBusy
from rlr_core import dcot

if TYPE_CHECKING:
    from app.services import AppServices

ESTIMATOR_CHOICES = [("RLR (recommended)", "rlr"), ("DDPO", "ddpo"), ("Truncated backprop", "truncated-bp"),
                     ("Full backprop", "full-bp")]
REST_CHOICES = [("lr", "lr"), ("zo", "zo"), ("none (biased)", "none")]
PROXY_DIR = "reward_proxy"
VERSIONS_DIR = "versions"


@dataclass(frozen=True)
class RoundSettings:
    estimator: str = "rlr"
    steps: int = 20
    # 8, not 4: RLR's likelihood-ratio terms use the leave-one-out mean as baseline, and at
    # batch 4 the built-in model's rounds lowered the reward as often as they raised it.
    batch_size: int = 8
    sampling_steps: int = 10
    learning_rate: float = 3e-3
    lora_rank: int = 4
    block: int = 2
    rest: str = "lr"
    truncation: int = 3
    max_prompts: int = 8
    # 1 = no classifier-free guidance while training: half the cost, and the adapter carries
    # over to guided sampling (it shifts the guided and the unguided prediction alike).
    guidance: float = 1.0
    samples_per_prompt: int = 2  # after the round: new-version samples per prompt (and as many pairs)
    sample_steps: int = 20  # ... drawn like the Generate tab draws (20 steps, guidance 3)
    sample_guidance: float = 3.0
    seed: int | None = None

    @classmethod
    def parse(cls, **raw: Any) -> RoundSettings:
        """Settings from the UI or the API, every value checked (missing ones take defaults)."""
        d = cls()
        get = lambda k: raw[k] if raw.get(k) not in (None, "") else getattr(d, k)
        return cls(
            estimator=check.choice(get("estimator"), "estimator", [v for _, v in ESTIMATOR_CHOICES]),
            steps=check.whole(get("steps"), "optimiser steps", 1, 2000),
            batch_size=check.whole(get("batch_size"), "batch size", 2, 256),
            sampling_steps=check.whole(get("sampling_steps"), "sampling steps", 3, 200),
            learning_rate=check.real(get("learning_rate"), "learning rate", 1e-7, 1.0),
            lora_rank=check.whole(get("lora_rank"), "LoRA rank", 1, 256),
            block=check.whole(get("block"), "HO block length", 1, 200),
            rest=check.choice(get("rest"), "rest of the chain", [v for _, v in REST_CHOICES]),
            truncation=check.whole(get("truncation"), "truncation length", 1, 200),
            max_prompts=check.whole(get("max_prompts"), "prompts per round", 1, 64),
            guidance=check.real(get("guidance"), "guidance", 1.0, 20.0),
            samples_per_prompt=check.whole(get("samples_per_prompt"), "samples per prompt", 1, 16),
            sample_steps=check.whole(get("sample_steps"), "sample steps", 2, 200),
            sample_guidance=check.real(get("sample_guidance"), "sample guidance", 1.0, 20.0),
            seed=None if raw.get("seed") in (None, "") else check.whole(raw["seed"], "seed", 0, 2**31 - 1),
        )


class RoundRunner:
    def __init__(self, services: AppServices):
        self.services = services
        self.store = services.store
        self._lock = threading.Lock()
        self._proxy = None
        self._scorer = None
        self._load_proxy()
        round_files.discard_orphans(self.store)  # folders of rounds a killed process left behind

    # ------------------------------------------------------------------ reward proxy
    @property
    def proxy_dir(self) -> Path:
        return self.services.data_dir / PROXY_DIR

    def _load_proxy(self) -> None:
        if not (self.proxy_dir / "reward_proxy.json").exists():
            return
        try:
            from rlr_core.feedback.reward_proxy import RewardProxy

            self._set_proxy(RewardProxy.load(self.proxy_dir))
        except Exception as err:  # an unreadable proxy only costs active selection until the next round
            print(f"warning: could not load the reward proxy in {self.proxy_dir}: {err}")

    def _set_proxy(self, proxy) -> None:
        from rlr_core.feedback.active_selection import DisagreementScorer

        with self._lock:
            self._proxy = proxy
            self._scorer = DisagreementScorer(proxy)

    def active_selection_scorer(self):
        with self._lock:
            return self._scorer

    # ------------------------------------------------------------------ control
    def start(self, settings: RoundSettings, password: Any = None, auto: bool = False) -> int:
        if not auto:
            self.services.check_admin(password)
        counts = self.store.counts()
        if counts["ratings"] + counts["comparisons"] == 0:
            raise AppError("rate or compare a few samples first: the round learns its reward from them")
        base_version = self.services.active_version_id
        try:
            job_id = self.services.worker.submit(
                f"round on {self.services.version_name(base_version)}",
                lambda ctx: self._run(ctx, settings, base_version))
        except WorkerBusy:
            raise AppError("a training round is already running; stop it or wait for it to finish") from None
        self.services.state.update(ratings_at_last_round=counts["ratings"] + counts["comparisons"],
                                   extra={**self.services.state.get().extra, "last_settings": asdict(settings)})
        return job_id

    def stop(self, password: Any = None) -> bool:
        self.services.check_admin(password)
        return self.services.worker.stop()

    def set_auto_train(self, every: Any, password: Any = None) -> int:
        self.services.check_admin(password)
        n = check.whole(every, "auto-train interval", 0, 100_000)
        counts = self.store.counts()
        # Count from now: switching it on must not start a round for judgements made long ago.
        self.services.state.update(auto_train_every=n,
                                   ratings_at_last_round=counts["ratings"] + counts["comparisons"])
        return n

    def maybe_auto_train(self) -> bool:
        """After each judgement: start a round once N new ones came in (when switched on)."""
        state = self.services.state.get()
        if not state.auto_train_every or self.services.worker.status().active:
            return False
        counts = self.store.counts()
        total = counts["ratings"] + counts["comparisons"]
        if total - state.ratings_at_last_round < state.auto_train_every:
            return False
        last = {k: v for k, v in state.extra.get("last_settings", {}).items() if k != "seed"}
        settings = RoundSettings.parse(**last)  # the settings of the last round started by hand
        try:
            self.start(settings, auto=True)
        except AppError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        st: JobStatus = self.services.worker.status()
        return {"job_id": st.job_id, "state": st.state, "progress": st.progress, "message": st.message,
                "history": st.history, "error": st.error, **st.info}

    # ------------------------------------------------------------------ the round
    def _run(self, ctx: JobContext, settings: RoundSettings, base_version: int) -> dict[str, Any]:
        seed = settings.seed if settings.seed is not None else random.randint(0, 2**31 - 1)
        app_state = self.services.state.get()
        window = None
        if settings.estimator == "rlr" and app_state.focus_stage != "all":
            window = dcot.stage_window(app_state.focus_stage, settings.sampling_steps, app_state.boundaries)
        config = {**asdict(settings), "seed": seed, "focus_stage": app_state.focus_stage,
                  "boundaries": list(app_state.boundaries), "window": list(window) if window else None}
        round_id = self.store.start_training_round(base_version, config)
        ctx.report(0.0, "fitting the reward proxy", round_id=round_id, estimator=settings.estimator,
                   focus_stage=app_state.focus_stage, window=list(window) if window else None)
        try:
            result = self._train_round(ctx, settings, base_version, round_id, seed, window)
        except BaseException as err:
            message = "stopped on request" if ctx.stopped else f"{type(err).__name__}: {err}"
            try:
                self.store.fail_training_round(round_id, message)
                round_files.discard(self.store, round_id)  # a stopped round leaves no files behind
            except Exception:
                traceback.print_exc()
            raise
        return result

    def _train_round(self, ctx: JobContext, settings: RoundSettings, base_version: int, round_id: int,
                     seed: int, window: tuple[int, int] | None) -> dict[str, Any]:
        from rlr_core.feedback import reward_proxy

        proxy, report = reward_proxy.train_from_store(self.store)
        proxy.save(self.proxy_dir)
        self._set_proxy(proxy)
        proxy_info = {"proxy_heldout_accuracy": report["heldout_accuracy"],
                      "proxy_heldout_pairs": report["heldout_pairs"],
                      "proxy_comparisons": report["n_comparisons"], "proxy_ratings": report["n_ratings"]}
        self.store.update_training_round(round_id, 0.05, proxy_info)
        ctx.check_stop()

        prompts = round_prompts(self.store, settings.max_prompts)
        if not prompts:
            raise AppError("no prompts to train on: generate some samples first")
        ctx.report(0.05, "training", prompts=[p.as_dict() for p in prompts], **proxy_info)

        backend = self.services.models.training_copy(base_version)
        from app.training_job import train_lora

        started = time.time()
        out_dir = self.services.data_dir / VERSIONS_DIR / f"round-{round_id}"
        trained = train_lora(backend, proxy, prompts, settings, seed, window, out_dir, ctx,
                             on_progress=lambda frac: self._progress(ctx, round_id, 0.05 + 0.75 * frac),
                             boundaries=self.services.state.get().boundaries)
        ctx.check_stop()

        ctx.report(0.8, "saving the new version")
        parent = self.store.get_model_version(base_version)
        n_versions = len(self.store.model_versions())
        metrics = {**proxy_info, **trained.metrics, "train_seconds": round(time.time() - started, 1)}
        version_id = self.store.add_model_version(
            f"v{n_versions} ({settings.estimator})", parent_id=base_version,
            weights_path=str(Path(trained.weights_path).resolve().relative_to(self.services.data_dir.resolve())),
            config={**asdict(settings), "estimator": settings.estimator, "round_id": round_id, "seed": seed,
                    "parent": parent["name"], "prompts": [p.prompt for p in prompts]},
            metrics=metrics)
        ctx.report(0.85, "drawing the new version's samples and before/after pairs")
        n_pairs = self._draw_after_round(version_id, base_version, prompts, settings, seed)
        self.store.finish_training_round(round_id, version_id, {**metrics, "before_after_pairs": n_pairs})
        self.services.state.update(active_version_id=version_id)  # only now: the round is complete
        name = self.store.get_model_version(version_id)["name"]
        ctx.report(1.0, f"finished: {name} is active", version_id=version_id, version_name=name,
                   before_after_pairs=n_pairs)
        return {"round_id": round_id, "version_id": version_id, "metrics": metrics}

    def _progress(self, ctx: JobContext, round_id: int, fraction: float) -> None:
        ctx.report(progress=fraction)
        try:
            self.store.update_training_round(round_id, min(max(fraction, 0.0), 1.0))
        except Exception:  # progress bookkeeping must never end a round
            traceback.print_exc()

    def _draw_after_round(self, version_id: int, parent_id: int, prompts: list[RoundPrompt],
                          settings: RoundSettings, seed: int) -> int:
        """New-version samples for the rating queue, and the parent's from the same noise (pairs)."""
        texts = [p.prompt for p in prompts for _ in range(settings.samples_per_prompt)]
        gen = GenerationSettings(steps=settings.sample_steps, guidance=settings.sample_guidance)
        sample_seed = (seed + 1) % (2**31)
        for vid in (version_id, parent_id):
            with self.services.models.lock:
                images = draw(self.services.models.backend(vid), texts, sample_seed, gen)
            store_images(self.store, images, texts, sample_seed, gen, vid, origin="round")
        return len(texts)
