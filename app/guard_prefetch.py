"""The guard's probes of the next round's parent and base model, drawn ahead while the app is idle.

After a round, the guard (app/fidelity_guard.py) judges the new version, its parent and the base
model on the same probe prompts. Versions never change, so the parent's and the base's scores are
cached per probe and only the new version's have to wait for the round. This draws the others
before it starts: the probes the next round's guard would ask for, given the prompts in the store
now and the settings that round is likely to use (the model's defaults; with auto-train on, the
last round's over them, as auto-train starts it). Before the first round that is the base model's
half of the guard's images: on 2 cores the first round's guard took 12 s instead of 22
(bench/results/loop_split.json, ``idle_runs``).

It draws one probe prompt at a time, in the round process, and only while no round runs and no
one has drawn for a moment (``app.generation.ACTIVITY``): a click waits at most for one prompt's
images. Only for models sized for a CPU (``cpu_sized``, the built-in ones): each call hands the
model to the round process, 12 MB for the built-in image model but gigabytes for a Stable
Diffusion, whose rounds belong on a GPU anyway. What it has not drawn (a prompt added at the
last moment, other settings) the round draws itself, as it always did; the scores are the same
either way (each probe prompt has its own seed).
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import TYPE_CHECKING

from app import fidelity_guard
from app.errors import AppError
from app.generation import ACTIVITY
from app.prompts import round_prompts
from app.round_config import RoundConfig

if TYPE_CHECKING:
    from app.rounds import RoundRunner

QUIET_S = 1.0  # no draw for this long before drawing ahead (a person's next click is likely sooner)
POLL_S = 0.5
IDLE_POLL_S = 3.0  # when everything is drawn: how often to look for new prompts


class GuardPrefetch:
    """Draws the next round's parent and base probes in the background (see the module doc)."""

    def __init__(self, rounds: RoundRunner, quiet_s: float = QUIET_S):
        self.rounds = rounds
        self.quiet_s = quiet_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next_config(self) -> RoundConfig:
        """The settings the next round most likely uses: the model's defaults (the Train tab's),
        or with auto-train on the last round's over them (auto-train's own rule)."""
        if self.rounds.state.get().auto_train_every:
            try:
                return self.rounds.auto_train_config()
            except AppError:  # settings an older version of the app stored: auto-train would fail on them too
                pass
        return RoundConfig.parse({}, self.rounds.defaults)

    def missing(self) -> tuple[RoundConfig, list[tuple[int, str]]]:
        """(the next round's settings, the (version, probe prompt) pairs its guard would draw now)."""
        runner, config = self.rounds, self.next_config()
        judge = runner.judge
        if judge is None or not config.fidelity_threshold or not runner.store.model_versions():
            return config, []
        prompts = round_prompts(runner.store, config.max_prompts, runner.check_prompt)
        if not prompts:
            return config, []  # a round cannot start yet, and its held-out share depends on its prompts
        probes = fidelity_guard.round_probes(judge, prompts, runner.held_out_prompts, config.fidelity_probe_prompts)
        parent = runner.parent_of_next(auto=bool(runner.state.get().auto_train_every))
        todo = []
        for version in dict.fromkeys([parent, runner.root_of(parent)]):
            cached = set(runner.probes.keys(version))
            todo += [(version, p) for p in probes if fidelity_guard.ProbeKey.of(
                p, config.samples, config.fidelity_probe_images, judge) not in cached]
        return config, todo

    def idle(self) -> bool:
        return not self.rounds.worker.status().active and ACTIVITY.quiet_for() >= self.quiet_s

    def step(self) -> bool:
        """Draw one missing probe prompt if the app is idle; whether it drew."""
        if not self.idle():
            return False
        config, todo = self.missing()
        if not todo:
            return False
        version, prompt = todo[0]
        backend = self.rounds.models.backend(version)
        self.rounds.probes.scores(version, backend, self.rounds.judge, [prompt], config.samples,
                                  config.fidelity_probe_images, draw_fn=self.rounds.drawer(backend))
        return True

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._loop, name="guard-prefetch", daemon=True)
        self._thread.start()
        return self._thread

    def _loop(self) -> None:
        wait = POLL_S
        while not self._stop.wait(wait):
            try:
                drew = self.step()
                wait = POLL_S if drew or not self.idle() else IDLE_POLL_S
            except Exception:  # noqa: BLE001 - best effort: the round draws what is missing itself
                traceback.print_exc()
                wait = 60.0

    def wait_drawn(self, timeout: float) -> bool:
        """Block until nothing is missing (or ``timeout`` s); for a benchmark standing in for the
        minutes a person spends rating."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.missing()[1]:
                return True
            time.sleep(POLL_S)
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # at most one prompt's images in flight
