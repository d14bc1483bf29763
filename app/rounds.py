"""Training rounds as the app runs them, in the background worker.

One round:
1. fit the reward proxy to every rating and comparison in the store (its held-out accuracy is
   shown; it also drives the comparison tab's active selection from then on);
2. collect the prompts people used and edited, with their prompt-lab stage prompts;
3. fine-tune a LoRA adapter on a private copy of the active version (``rlr_core.training``); on a
   CPU the steps run in a process of their own (``rlr_core.training.round_process``), so serving
   raters never waits on them;
4. save it as a new model version, draw its samples into the rating queue, and draw blind
   before/after pairs (same prompts and seed through the parent) into the comparison queue;
5. finish the round in the store, and only then make the new version active.

A crash anywhere before step 5 leaves the round "running" in the store; the next start marks
it failed, and the active version is still the last good one (see ``app/state.py``).
"""

from __future__ import annotations

import functools
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from app import fidelity_guard, round_config, round_files, zerogpu
from app import validate as check
from app.errors import AppError
from app.generation import DrawFn, draw, store_images
from app.guard_prefetch import GuardPrefetch
from app.models import VERSIONS_DIR, ModelRegistry
from app.prompts import RoundPrompt, round_prompts
from app.round_config import RoundConfig
from app.state import StateFile
from app.worker import JobContext, JobStatus, Worker, WorkerBusy
from feedback_store import FeedbackStore
from rlr_core import dcot
from rlr_core.training import lora
from rlr_core.training.round_process import RoundProcess

PROXY_DIR = "reward_proxy"
PROXY_KEYS = ("proxy_heldout_accuracy", "proxy_heldout_pairs", "proxy_comparisons", "proxy_ratings")


def reward_scale(config: RoundConfig, spread: float) -> float:
    """s, which the proxy's reward is divided by in the round: its spread over the images people
    judged with ``normalize_reward`` (1 when that is not positive: a proxy with one image), else 1."""
    return spread if config.normalize_reward and spread > 0 else 1.0


class RoundRunner:
    """Starts, stops and runs rounds. It is given what it works with: the store, the worker that
    runs rounds in the background, the app state file, the model registry, the data folder, a
    check that the caller may change the model (``authorise(password)`` raises when not), and
    the active version (``active_version()``, which makes the base version on first use), the
    model's prompt check, and the image encoder the reward proxy learns on."""

    def __init__(self, store: FeedbackStore, worker: Worker, state: StateFile, models: ModelRegistry,
                 data_dir: Path, authorise: Callable[[Any], None], active_version: Callable[[], int],
                 check_prompt: Callable[[str], str], image_encoder: Any = None,
                 defaults: Mapping[str, Any] = round_config.DEFAULTS, judge: Any = None,
                 held_out_prompts: Sequence[str] = ()):
        self.store = store
        self.worker = worker
        self.state = state
        self.models = models
        self.data_dir = Path(data_dir)
        self.authorise = authorise
        self.active_version = active_version
        self._lock = threading.Lock()
        self._proxy = None
        self._scorer = None
        self.check_prompt = check_prompt
        self.image_encoder = image_encoder  # None: the proxy's default (the built-in perception model)
        self.defaults = dict(defaults)  # the model's round defaults (auto-train fills gaps with them too)
        self.judge = judge  # the backend's fidelity judge; None: fidelity is not guarded
        self.held_out_prompts = list(held_out_prompts)
        self.probes = fidelity_guard.ProbeCache(self.data_dir)
        self._process: RoundProcess | None = None  # started with the first round trained on a CPU
        self.prefetch = GuardPrefetch(self)  # started by warm_up
        self._load_proxy()
        round_files.discard_orphans(self.store)  # folders of rounds a killed process left behind

    # ------------------------------------------------------------------ reward proxy
    @property
    def proxy_dir(self) -> Path:
        return self.data_dir / PROXY_DIR

    def _load_proxy(self) -> None:
        if not (self.proxy_dir / "reward_proxy.json").exists():
            return
        try:
            from rlr_core.feedback.reward_proxy import RewardProxy

            # With this app's encoder: a proxy trained on other features is refused (and retrained next round).
            self._set_proxy(RewardProxy.load(self.proxy_dir, image_encoder=self.image_encoder))
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
    def start(self, config: RoundConfig, password: Any = None, auto: bool = False) -> int:
        if not auto:
            self.authorise(password)
        counts = self.store.counts()
        if counts["ratings"] + counts["comparisons"] == 0:
            raise AppError("rate or compare a few samples first: the round learns its reward from them")
        base_version = self.parent_of_next(auto)
        try:
            job_id = self.worker.submit(f"round on {self.store.get_model_version(base_version)['name']}",
                                        lambda ctx: self._run(ctx, config, base_version))
        except WorkerBusy:
            raise AppError("a training round is already running; stop it or wait for it to finish") from None
        self.state.update(ratings_at_last_round=counts["ratings"] + counts["comparisons"],
                          extra={**self.state.get().extra, "last_settings": config.public()})
        return job_id

    def parent_of_next(self, auto: bool) -> int:
        """The version a round builds on: auto-train's, the best-judged one (app/safeguards.py), not the last."""
        return self.best_judged_version() if auto else self.active_version()

    def auto_train_config(self) -> RoundConfig:
        """The settings of the last round started by hand (its seed left out); what they leave out,
        the model's defaults. Raises AppError on settings this version of the app refuses."""
        last = {k: v for k, v in self.state.get().extra.get("last_settings", {}).items() if k != "seed"}
        return RoundConfig.parse(last, self.defaults)

    def best_judged_version(self) -> int:
        from app.safeguards import best_judged, fidelity_flags, judge

        active = self.active_version()  # stores the base version on first use
        best = best_judged(judge(self.store.version_stats(), fidelity_flags(self.store.model_versions())))
        return best if best is not None else active

    def stop(self, password: Any = None) -> bool:
        self.authorise(password)
        return self.worker.stop()

    def set_auto_train(self, every: Any, password: Any = None) -> int:
        self.authorise(password)
        n = check.whole(every, "auto-train interval", 0, 100_000)
        counts = self.store.counts()
        # Count from now: switching it on must not start a round for judgements made long ago.
        self.state.update(auto_train_every=n,
                          ratings_at_last_round=counts["ratings"] + counts["comparisons"])
        return n

    def maybe_auto_train(self) -> bool:
        """After each judgement: start a round once N new ones came in (when switched on)."""
        state = self.state.get()
        if not state.auto_train_every or self.worker.status().active:
            return False
        counts = self.store.counts()
        total = counts["ratings"] + counts["comparisons"]
        if total - state.ratings_at_last_round < state.auto_train_every:
            return False
        try:
            self.start(self.auto_train_config(), auto=True)
        except AppError:
            return False
        return True

    def next_estimator(self) -> str:
        """The estimator the next round uses: auto-train's (the last round started by hand) when
        auto-train is on and one was started, else the model's default (the Train tab's)."""
        state = self.state.get()
        last = state.extra.get("last_settings", {}).get("estimator") if state.auto_train_every else None
        return last or self.defaults["estimator"]

    def status(self) -> dict[str, Any]:
        """The running or last round; after a restart (the worker idle), the last finished round
        as the store has it, with its curves and the guard's verdict."""
        st: JobStatus = self.worker.status()
        if st.state == "idle":
            last = self._last_finished_round()
            if last is not None:
                return last
        return {"job_id": st.job_id, "state": st.state, "progress": st.progress, "message": st.message,
                "history": st.history, "error": st.error, **st.info}

    def _last_finished_round(self) -> dict[str, Any] | None:
        rounds = self.store.training_rounds("finished")
        if not rounds:
            return None
        r = rounds[-1]
        m, name = r["metrics"], self.store.get_model_version(r["output_version_id"])["name"]
        info = {k: m[k] for k in (*PROXY_KEYS, "plateau_stopped_at", "fidelity_stopped_at", "fidelity_note",
                                  "fidelity_flagged", "before_after_pairs", "fidelity", "fidelity_parent",
                                  "fidelity_base", "fidelity_drop") if k in m}
        return {"job_id": None, "state": "finished", "progress": 1.0, "error": None,
                "message": f"last round (round {r['id']}, finished {r.get('finished_at') or ''}): {name}",
                "history": m.get("history", []), "round_id": r["id"], "estimator": r["config"].get("estimator"),
                "seed": r["config"].get("seed"), "version_id": r["output_version_id"], "version_name": name,
                "window": r["config"].get("window"), "focus_stage": r["config"].get("focus_stage"), **info}

    # ------------------------------------------------------------------ the round
    def _run(self, ctx: JobContext, config: RoundConfig, base_version: int) -> dict[str, Any]:
        seed = config.seed if config.seed is not None else random.randint(0, 2**31 - 1)
        app_state = self.state.get()
        window = None
        if config.takes_window and app_state.focus_stage != "all":  # RLR: its HO block in the stage
            window = dcot.stage_window(app_state.focus_stage, config.training.sampler.steps, app_state.boundaries)
        record = {**config.public(), "seed": seed, "focus_stage": app_state.focus_stage,
                  "boundaries": list(app_state.boundaries), "window": list(window) if window else None}
        round_id = self.store.start_training_round(base_version, record)
        # the seed is reported so the round can be replayed (train_start with this seed, same data)
        ctx.report(0.0, "fitting the reward proxy", round_id=round_id, seed=seed, estimator=config.estimator,
                   focus_stage=app_state.focus_stage, window=list(window) if window else None)
        try:
            result = self._train_round(ctx, config, base_version, round_id, seed, window, app_state.boundaries)
        except BaseException as err:
            message = "stopped on request" if ctx.stopped else f"{type(err).__name__}: {err}"
            try:
                self.store.fail_training_round(round_id, message)
                round_files.discard(self.store, round_id)  # a stopped round leaves no files behind
            except Exception:
                traceback.print_exc()
            raise
        return result

    def _train_round(self, ctx: JobContext, config: RoundConfig, base_version: int, round_id: int,
                     seed: int, window: tuple[int, int] | None, boundaries: tuple[float, float]) -> dict[str, Any]:
        from rlr_core.feedback import reward_proxy

        proxy, report = reward_proxy.train_from_store(self.store, image_encoder=self.image_encoder)
        proxy.save(self.proxy_dir)
        self._set_proxy(proxy)
        proxy_info = {"proxy_heldout_accuracy": report["heldout_accuracy"],
                      "proxy_heldout_pairs": report["heldout_pairs"],
                      "proxy_comparisons": report["n_comparisons"], "proxy_ratings": report["n_ratings"],
                      "proxy_reward_spread": round(report["reward_spread"], 4)}
        self.store.update_training_round(round_id, 0.05, proxy_info)
        ctx.check_stop()

        prompts = round_prompts(self.store, config.max_prompts, self.check_prompt)
        if not prompts:
            raise AppError("no prompts to train on: generate some samples first")
        ctx.report(0.05, "training", prompts=[p.as_dict() for p in prompts], **proxy_info)

        backend = self.models.training_copy(base_version)
        from app.training_job import train_lora

        started = time.time()
        out_dir = self.data_dir / VERSIONS_DIR / f"round-{round_id}"
        # the prompt lab's boundaries, so training samples as the app does
        training = config.for_round([p.prompt for p in prompts],
                                    {p.prompt: p.stages.as_list() for p in prompts if p.stages}, seed,
                                    boundaries, window)
        judge = self.judge
        trained = train_lora(backend, proxy, training, out_dir, ctx,
                             on_progress=lambda frac: self._progress(ctx, round_id, 0.05 + 0.7 * frac),
                             penalty=config.uncertainty_penalty, patience=config.patience,
                             judge=judge if judge is not None and judge.differentiable else None,
                             fidelity_weight=config.fidelity_weight, anchor_weight=config.anchor_fidelity,
                             reward_scale=reward_scale(config, report["reward_spread"]),
                             watch=self._watch(backend, prompts, config, base_version),
                             process=self._round_process(backend))
        ctx.check_stop()
        metrics = {**proxy_info, **trained.metrics, "train_seconds": round(time.time() - started, 1)}

        name = f"v{len(self.store.model_versions())} ({config.estimator})"
        new_scores, verdict, note, guard_metrics = self._guard(ctx, backend, base_version, prompts, config, name,
                                                               Path(trained.weights_path))
        metrics.update(guard_metrics)
        ctx.check_stop()

        ctx.report(0.8, "saving the new version")
        parent = self.store.get_model_version(base_version)
        version_id = self.store.add_model_version(
            name, parent_id=base_version,
            weights_path=str(Path(trained.weights_path).resolve().relative_to(self.data_dir.resolve())),
            config={**config.public(), "round_id": round_id, "seed": seed,
                    "parent": parent["name"], "prompts": [p.prompt for p in prompts]},
            metrics=metrics)
        if verdict is not None:  # versions never change: the parent of a later round reuses these
            self.probes.remember(version_id, self.judge, new_scores, config.samples, config.fidelity_probe_images)
        ctx.report(0.85, "drawing the new version's samples and before/after pairs")
        n_pairs = self._draw_after_round(version_id, base_version, prompts, config, seed)
        flagged = verdict is not None and verdict.flagged
        self.store.finish_training_round(round_id, version_id, {**metrics, "before_after_pairs": n_pairs,
                                                                "fidelity_note": note, "history": ctx.history()})
        if not flagged:
            self.state.update(active_version_id=version_id)  # only now: the round is complete
        message = (f"finished: {note}; {self.store.get_model_version(self.active_version())['name']} stays active"
                   if flagged else f"finished: {name} is active")
        ctx.report(1.0, message, version_id=version_id, version_name=name, before_after_pairs=n_pairs,
                   plateau_stopped_at=metrics.get("plateau_stopped_at"),
                   fidelity_stopped_at=metrics.get("fidelity_stopped_at"), fidelity_note=note,
                   **({"fidelity_flagged": False} if verdict is None else verdict.metrics()))
        return {"round_id": round_id, "version_id": version_id, "metrics": metrics}

    def _round_process(self, backend) -> RoundProcess | None:
        """The process a round trained on the CPU runs its steps in (kept for later rounds); None on
        a GPU (the steps run on the device and the thread mostly waits for it) and on ZeroGPU
        (its own chunked path)."""
        if backend.device.type != "cpu" or zerogpu.chunked_training():
            return None
        if self._process is None:
            self._process = RoundProcess(threads=torch.get_num_threads())
        return self._process

    def warm_up(self) -> threading.Thread | None:
        """Start the round process in the background, so the first round does not wait for it, then
        draw the next round's guard probes ahead while idle (app/guard_prefetch.py). ``python app.py``
        calls this once it serves; nothing when rounds train on a GPU."""
        process = self._round_process(self.models.base)
        if process is None:
            return None

        def start() -> None:
            try:
                process.warm_up()
            except Exception:  # noqa: BLE001 - best effort: the first round starts the process itself and reports
                return
            if self.judge is not None and self.models.base.cpu_sized:  # each draw pickles the model over
                self.prefetch.start()

        thread = threading.Thread(target=start, name="round-process-warm-up", daemon=True)
        thread.start()
        return thread

    def drawer(self, backend) -> DrawFn:
        """How a round draws (its probes, its new samples): in the round process when there is one."""
        process = self._round_process(backend)
        return draw if process is None else functools.partial(process.run, draw)

    def close(self) -> None:
        """End the round process, if one was started (after the worker has stopped)."""
        self.prefetch.close()
        if self._process is not None:
            self._process.close()

    def _watch(self, backend, prompts: list[RoundPrompt], config: RoundConfig,
               parent: int) -> Callable[[], fidelity_guard.FidelityWatch] | None:
        """What makes the in-round fidelity check once the adapter exists; None when it is off."""
        if self.judge is None or not config.fidelity_check_every or not config.fidelity_threshold:
            return None
        watched = fidelity_guard.probe_prompts(self.judge, [p.prompt for p in prompts], [], self.held_out_prompts,
                                               limit=fidelity_guard.WATCH_PROMPTS)
        # drawn as the round's samples are: at the training chain's length (10 steps) it missed a
        # drop the after-round guard saw at 20 (bench/loop.py, truncated BP). The parent's scores on
        # these probes come from the guard's cache (WATCH_IMAGES = PROBE_IMAGES: the same keys).
        drawer = self.drawer(backend)
        reference = self.probes.scores(parent, self.models.backend(parent), self.judge, watched, config.samples,
                                       fidelity_guard.WATCH_IMAGES, draw_fn=drawer)
        return lambda: fidelity_guard.FidelityWatch(backend, self.judge, watched, config.samples,
                                                    config.fidelity_threshold, config.fidelity_check_every,
                                                    reference, draw_fn=drawer, rule=config.fidelity_rule)

    def _guard(self, ctx: JobContext, backend, base_version: int, prompts: list[RoundPrompt], config: RoundConfig,
               name: str, folder: Path) -> tuple[dict[str, float], fidelity_guard.Verdict | None, str, dict[str, Any]]:
        """The guard's verdict on the round's version (the trained copy ``backend``, saved in
        ``folder``). A flagged version is scaled back toward its parent, halving the round's
        change up to ``config.fidelity_backoff`` times, and judged again at each; the first that
        passes becomes the version (its folder rewritten). (its probe scores, the verdict, the
        note, the metrics to record)"""
        scores, verdict = self._judge_fidelity(ctx, backend, base_version, prompts, config)
        if verdict is None:
            return scores, None, "prompt fidelity is not guarded: this model has no judge", {}
        full, keep = verdict, 1.0
        for halvings in range(1, (config.fidelity_backoff if full.flagged else 0) + 1):
            ctx.check_stop()
            lora.scale_back(backend, self.models.backend(base_version), config.training.finetune)
            halved, again = self._judge_fidelity(
                ctx, backend, base_version, prompts, config,
                f"{name} {full.loss()}: judging it again at {0.5 ** halvings:g} of the round's change")
            if not again.flagged:
                scores, verdict, keep = halved, again, 0.5 ** halvings
                version_config, version_metrics = lora.read_version(folder)
                lora.write_version(backend, folder, config.training.finetune,
                                   {**version_config, "fidelity_strength": keep}, version_metrics)
                break
        note = verdict.note(name)
        if verdict.flagged and config.fidelity_backoff:
            tried = " and ".join(f"{0.5 ** k:g}" for k in range(1, config.fidelity_backoff + 1))
            note = (f"{name} {verdict.loss()}; scaled back to {tried} of its round's change it still lost more; "
                    "it was not made active")
        metrics = {**verdict.metrics(), "fidelity_strength": keep}
        if keep < 1:
            note = f"{name} scaled back to {keep:g} of its round's change: {note}; at full strength it {full.loss()}"
            metrics.update({"fidelity_full": full.metrics()["fidelity"],
                            **{"fidelity_full_drop" + ("" if group == "all" else f"_{group}"): round(drop, 4)
                               for group, drop in full.largest_drops().items()}})
        return scores, verdict, note, {**metrics, "fidelity_note": note}

    def _judge_fidelity(self, ctx: JobContext, backend, base_version: int, prompts: list[RoundPrompt],
                        config: RoundConfig, message: str = "judging prompt fidelity: the new version, its parent "
                        "and the base model on fixed probes") -> tuple[dict[str, float], fidelity_guard.Verdict | None]:
        """The guard (app/fidelity_guard.py): the new version (the trained copy), its parent and the
        base model judged on the same probes; (the new version's scores, the verdict)."""
        judge = self.judge
        if judge is None:
            return {}, None
        ctx.report(0.75, message)
        probes = fidelity_guard.round_probes(judge, prompts, self.held_out_prompts, config.fidelity_probe_prompts)
        drawer = self.drawer(backend)
        images = config.fidelity_probe_images
        new = fidelity_guard.measure(backend, judge, probes, config.samples, images, draw_fn=drawer)
        parent = self.probes.scores(base_version, self.models.backend(base_version), judge, probes, config.samples,
                                    images, draw_fn=drawer)
        root = self.root_of(base_version)
        base = self.probes.scores(root, self.models.backend(root), judge, probes, config.samples, images,
                                  draw_fn=drawer)
        return new, fidelity_guard.verdict(judge, new, parent, base, config.fidelity_threshold,
                                           held_out=self.held_out_prompts, rule=config.fidelity_rule)

    def root_of(self, version_id: int) -> int:
        """The base version at the start of this version's lineage."""
        seen = set()
        while True:
            parent = self.store.get_model_version(version_id)["parent_id"]
            if parent is None or parent in seen:
                return version_id
            seen.add(version_id)
            version_id = parent

    def _progress(self, ctx: JobContext, round_id: int, fraction: float) -> None:
        ctx.report(progress=fraction)
        try:
            self.store.update_training_round(round_id, min(max(fraction, 0.0), 1.0))
        except Exception:  # progress bookkeeping must never end a round
            traceback.print_exc()

    def _draw_after_round(self, version_id: int, parent_id: int, prompts: list[RoundPrompt],
                          config: RoundConfig, seed: int) -> int:
        """New-version samples for the rating queue, and the parent's from the same noise (pairs)."""
        texts = [p.prompt for p in prompts for _ in range(config.samples_per_prompt)]
        sample_seed = (seed + 1) % (2**31)
        for vid in (version_id, parent_id):
            backend = self.models.backend(vid)
            images = self.drawer(backend)(backend, texts, sample_seed, config.samples)
            store_images(self.store, images, texts, sample_seed, config.samples, vid, origin="round")
        return len(texts)
