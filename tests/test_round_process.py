"""A round's steps in a process of their own (rlr_core.training.round_process): the same adapter as
in this process, the caller's check between chunks, and a clear error when the process dies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rlr_core.training import run_round
from rlr_core.training.chunked import run_chunked_round
from rlr_core.training.round_process import RoundProcess
from tests.test_chunked_round import TINY, RedReward, adapter, assert_same_adapter, config, fresh_backend


@pytest.fixture(scope="module")
def rounds():
    process = RoundProcess(threads=1)
    yield process
    process.close()


def test_a_round_in_its_own_process_trains_the_adapter_of_one_in_this_process(tmp_path: Path, rounds) -> None:
    here = run_round(fresh_backend(), RedReward(), config(), tmp_path / "here")
    steps, seen, checked = [], [], []
    away = run_chunked_round(fresh_backend(), RedReward(), config(), tmp_path / "away", progress=steps.append,
                             chunk_seconds=TINY, call=rounds.chunk_call(), on_observed=seen.append, check_every=2,
                             on_check=lambda state: checked.append(state.step) and False)
    assert_same_adapter(here.version, away.version)
    assert [p.step for p in steps] == [1, 2, 3, 4]
    assert len(seen) == 4 and all(isinstance(v, float) for v in seen)  # each step's side statistic came back
    assert checked == [2, 4]  # every 2 steps, the last one included, before the version is written
    assert away.metrics["chunks"] == 4 and not away.stopped


def test_the_check_between_chunks_puts_back_earlier_weights_and_ends_the_round(tmp_path: Path, rounds) -> None:
    kept: dict[int, list[torch.Tensor]] = {}

    def check(state) -> bool:
        kept[state.step] = [p.clone() for p in state.params]
        if state.step == 4:
            state.params = kept[2]  # as the fidelity watch does: back to the last good check
            return True
        return False

    run = run_chunked_round(fresh_backend(), RedReward(), config(steps=6), tmp_path / "v", chunk_seconds=60,
                            call=rounds.chunk_call(), check_every=2, on_check=check)
    assert sorted(kept) == [2, 4]  # ended at the failed check: steps 5 and 6 never ran
    written = adapter(run.version)
    assert sorted(v.sum().item() for v in written.values()) == pytest.approx(
        sorted(v.sum().item() for v in kept[2]), rel=1e-6)
    assert run.metrics["steps_done"] == 4


class DiesInTheRoundProcess(RedReward):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if os.getpid() != self.parent:
            os._exit(3)  # as if the kernel killed it (out of memory)
        return super().__call__(images, prompts)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "parent": os.getpid()}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.parent = state["parent"]


def test_a_dead_round_process_fails_the_round_clearly_and_the_next_round_gets_a_new_one(tmp_path: Path) -> None:
    rounds = RoundProcess(threads=1)
    try:
        with pytest.raises(RuntimeError, match="the training process ended unexpectedly"):
            run_chunked_round(fresh_backend(), DiesInTheRoundProcess(), config(), tmp_path / "dead",
                              call=rounds.chunk_call(), check_every=0, on_check=lambda s: False)
        assert not (tmp_path / "dead").exists()
        again = run_chunked_round(fresh_backend(), RedReward(), config(steps=2), tmp_path / "again",
                                  call=rounds.chunk_call(), check_every=0, on_check=lambda s: False)
        assert again.version is not None and again.metrics["steps_done"] == 2
    finally:
        rounds.close()


def test_the_round_process_ends_when_the_app_is_killed() -> None:
    """Even after ``kill -9`` of the app (no close()), its round process does not linger."""
    import signal
    import subprocess
    import sys
    import time

    # a tensor sent across (as every round sends its model) is what kept the process waiting before
    script = ("import os, time, torch\n"
              "from rlr_core.training.round_process import RoundProcess\n"
              "rounds = RoundProcess(threads=1)\n"
              "assert float(rounds.run(torch.add, torch.ones(8), torch.ones(8)).sum()) == 16\n"
              "print(rounds.run(os.getpid), flush=True)\n"
              "time.sleep(600)\n")
    app = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                           cwd=Path(__file__).resolve().parent.parent)
    child = int(app.stdout.readline())
    os.kill(child, 0)  # running
    app.send_signal(signal.SIGKILL)
    app.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init once it exits; a zombie still answers kill(0)
            if open(f"/proc/{child}/status").read().find("State:\tZ") >= 0:
                return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the round process outlived its app by 30 s")


def test_tensors_sent_to_the_round_process_hold_no_file_descriptors(rounds) -> None:
    """Models go to the round process with every round; torch's shared-memory transfer kept a file
    descriptor open per tensor (the test suite ran out of them)."""
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    rounds.run(torch.add, torch.ones(4), torch.ones(4))  # the process is up
    before = open_fds()
    model = [torch.randn(16) for _ in range(200)]  # kept alive, as a loaded version is
    results = [rounds.run(torch.add, t, 1.0) for t in model[:20]]
    rounds.run(sum, model)
    assert torch.equal(results[3], model[3] + 1)
    assert open_fds() <= before + 2


def test_warm_up_starts_the_process_that_later_rounds_use(rounds) -> None:
    pid = rounds.warm_up()
    assert pid != os.getpid()
    assert rounds.run(os.getpid) == pid  # the round finds it running: no second start
