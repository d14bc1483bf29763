"""The background worker: one thread that runs one job (a training round) at a time.

Why a thread and not a process: the job shares the app's model and store, and torch releases
the GIL inside its kernels, so the UI threads keep answering while a round runs. The job gets
a ``JobContext``: it reports progress and per-step values through it, and checks its stop
event between steps (stopping is cooperative; nothing is killed mid-write).
"""

from __future__ import annotations

import copy
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class WorkerBusy(RuntimeError):
    """A job is already running or queued."""


class JobStopped(Exception):
    """Raised inside a job (by ``JobContext.check_stop``) to end it early on request."""


@dataclass
class JobStatus:
    job_id: int = 0
    name: str = ""
    state: str = "idle"  # idle, queued, running, stopping, finished, stopped, failed
    progress: float = 0.0
    message: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per reported step
    info: dict[str, Any] = field(default_factory=dict)  # anything else the UI shows (prompts used, ...)
    result: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "stopping")


class JobContext:
    """What a job sees: a stop event and thread-safe ways to report what it is doing."""

    def __init__(self, worker: Worker, job_id: int):
        self._worker = worker
        self.job_id = job_id
        self.stop_event = worker._stop_event

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def check_stop(self) -> None:
        if self.stopped:
            raise JobStopped()

    def report(self, progress: float | None = None, message: str | None = None, **info: Any) -> None:
        with self._worker._lock:
            st = self._worker._status
            if progress is not None:
                st.progress = min(max(float(progress), 0.0), 1.0)
            if message is not None:
                st.message = message
            st.info.update(info)

    def history(self) -> list[dict[str, Any]]:
        """A copy of the rows logged so far."""
        with self._worker._lock:
            return [dict(r) for r in self._worker._status.history]

    def log_step(self, **values: Any) -> None:
        """Append one row (e.g. step, reward, uncertainty) to the history the plots show."""
        with self._worker._lock:
            self._worker._status.history.append(dict(values))


class Worker:
    """``submit`` a job; the worker thread runs it; ``status`` is a snapshot any thread can read."""

    def __init__(self, name: str = "rlr-worker", nice: int = 10):
        self._nice = nice
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._status = JobStatus()
        self._next_id = 1
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, name: str, fn: Callable[[JobContext], Any],
               on_finish: Callable[[JobStatus], None] | None = None) -> int:
        with self._lock:
            if self._status.active:
                raise WorkerBusy(f"'{self._status.name}' is still {self._status.state}; wait for it or stop it")
            job_id = self._next_id
            self._next_id += 1
            self._status = JobStatus(job_id=job_id, name=name, state="queued", message="queued")
            self._stop_event.clear()
            self._idle.clear()
            self._jobs.put_nowait((job_id, fn, on_finish))
        return job_id

    def stop(self) -> bool:
        """Ask the running job to stop at its next check; False if nothing is running."""
        with self._lock:
            if not self._status.active:
                return False
            self._stop_event.set()
            self._status.state = "stopping"
            self._status.message = "stopping after the current step..."
            return True

    def status(self) -> JobStatus:
        with self._lock:
            return copy.deepcopy(self._status)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; True if that happened within ``timeout``."""
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        _lower_priority(self._nice)
        while True:
            job_id, fn, on_finish = self._jobs.get()
            with self._lock:
                if self._status.state == "queued":
                    self._status.state = "running"
                self._status.started_at = time.time()
            ctx = JobContext(self, job_id)
            try:
                if self._stop_event.is_set():
                    raise JobStopped()
                result = fn(ctx)
                final = {"state": "finished", "result": result, "progress": 1.0}
            except JobStopped:
                final = {"state": "stopped", "message": "stopped on request"}
            except Exception as err:  # a failed job must not kill the worker thread
                traceback.print_exc()
                final = {"state": "failed", "error": f"{type(err).__name__}: {err}",
                         "message": f"failed: {err}"}
            with self._lock:
                for key, value in final.items():
                    setattr(self._status, key, value)
                if self._status.state == "finished" and not self._status.message.startswith("finished"):
                    self._status.message = "finished"  # unless the job said more
                self._status.finished_at = time.time()
                done = copy.deepcopy(self._status)
            if on_finish is not None:
                try:
                    on_finish(done)
                except Exception:
                    traceback.print_exc()
            self._idle.set()


def _lower_priority(nice: int) -> None:
    """Make this thread (only this one: Linux schedules threads as tasks) yield the CPU to the
    UI threads, and make threads waiting for the GIL get it sooner.

    Why: a training step keeps one core busy; on a small machine the request handlers must
    not wait behind it. A waiting thread takes the GIL after ``switchinterval`` (default 5 ms),
    and answering one request takes the GIL many times."""
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass  # not allowed here (some containers); the thread keeps the normal priority
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
