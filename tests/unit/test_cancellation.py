"""Cancelling a job in a phase that never checks (`appliance.cancellation`), in this process: a
blocking call is interrupted (through `except Exception`, once), a cooperative or committing
section is not, and neither are its children when the watcher's look was stale; the job's own
children are stopped once it was interrupted, and a detached one is spared. Real signals and
processes; no job database."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance import cancellation
from appliance.cancellation import JobCancelled


def _ask_soon(flag: Path, after: float = 0.3) -> threading.Timer:
    timer = threading.Timer(after, flag.touch)
    timer.start()
    return timer


def test_a_blocking_call_is_interrupted(tmp_path: Path) -> None:
    flag = tmp_path / "cancel"
    _ask_soon(flag)
    with pytest.raises(JobCancelled), cancellation.armed(flag):
        time.sleep(60)  # returns at once with the interrupt, long before
    assert cancellation.interrupted()


def test_nothing_is_interrupted_outside_a_job(tmp_path: Path) -> None:
    flag = tmp_path / "cancel"
    with cancellation.armed(flag):
        pass
    flag.touch()
    cancellation._on_interrupt(cancellation.INTERRUPT, None)  # a stray signal: no effect


def test_a_cooperative_section_is_left_to_stop_by_itself(tmp_path: Path) -> None:
    flag = tmp_path / "cancel"
    seen_in_section = False
    with pytest.raises(JobCancelled), cancellation.armed(flag):
        with cancellation.deferred():
            flag.touch()
            for _ in range(10):  # several watcher polls: none interrupts this section
                time.sleep(cancellation.POLL_S)
            seen_in_section = True
        time.sleep(60)  # out of the section the cancel applies
    assert seen_in_section


def test_after_finishing_nothing_interrupts(tmp_path: Path) -> None:
    flag = tmp_path / "cancel"
    with cancellation.armed(flag):
        cancellation.finishing()
        flag.touch()
        time.sleep(cancellation.POLL_S * 5)
    assert not cancellation.interrupted()


def test_the_jobs_children_are_stopped_and_a_detached_one_is_spared(tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    flag, started = tmp_path / "cancel", []
    try:
        with pytest.raises(JobCancelled), cancellation.armed(flag):
            started.append(subprocess.Popen(sleeper, start_new_session=True))  # a job it started
            started.append(subprocess.Popen(sleeper))  # a converter it waits for
            _ask_soon(flag)
            started[1].wait()
        detached, child = started
        assert child.wait(timeout=60) != 0  # stopped by a signal, not finished
        assert detached.poll() is None
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_an_except_exception_in_the_interrupted_code_does_not_swallow_the_cancel(tmp_path: Path) -> None:
    """Library code often says `except Exception: continue` (a GGUF metadata walk, a template
    check): the cancel must go through it, as KeyboardInterrupt does."""
    flag, swallowed = tmp_path / "cancel", []
    _ask_soon(flag)
    with pytest.raises(JobCancelled), cancellation.armed(flag):
        for _ in range(300):
            try:
                time.sleep(0.1)
            except Exception as exc:  # the point of the test
                swallowed.append(exc)
    assert swallowed == []


def test_a_stale_reading_of_the_phase_neither_stops_children_nor_loses_the_cancel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher decides to interrupt, and the job enters a cooperative section before the
    interrupt arrives (simulated: the section opens as the watcher sends). The handler declines,
    so the children of that section are left alone; once the section ends, the cancel applies
    (sent again) and only then are the job's children stopped."""
    flag, sends = tmp_path / "cancel", list[int]()
    real_kill = signal.pthread_kill

    def racing_a_cooperative_section(thread: int, signum: int) -> None:
        if not sends:
            cancellation._main.deferred += 1  # what the main thread did meanwhile
        sends.append(signum)
        real_kill(thread, signum)

    monkeypatch.setattr(signal, "pthread_kill", racing_a_cooperative_section)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child: subprocess.Popen[bytes] | None = None
    try:
        with pytest.raises(JobCancelled), cancellation.armed(flag):
            child = subprocess.Popen(sleeper)
            flag.touch()
            while not sends:  # no interrupt can land: the phase is deferred once it is sent
                time.sleep(0.05)
            time.sleep(cancellation.POLL_S * 5)  # the watcher's next looks: still deferred
            alive_in_section = child.poll() is None
            cancellation._main.deferred -= 1  # the section ends
            time.sleep(60)
        assert alive_in_section and child is not None
        assert child.wait(timeout=60) != 0  # stopped, once the job was really interrupted
        assert len(sends) >= 2
    finally:
        if child is not None:
            child.kill()
            child.wait()


def test_the_cleanup_after_a_cancel_is_not_interrupted_again(tmp_path: Path) -> None:
    """The handler raises once per job: the `finally` that removes a staging directory after the
    interrupt runs to its end, however long it takes."""
    flag, cleaned = tmp_path / "cancel", []
    _ask_soon(flag)
    with pytest.raises(JobCancelled), cancellation.armed(flag):
        try:
            time.sleep(60)
        finally:
            for _ in range(10):
                time.sleep(cancellation.POLL_S)
            cleaned.append(True)
    assert cleaned == [True]
