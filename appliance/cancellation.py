"""Cancelling a job in every phase, without corrupting what it writes.

A cancel is asked for by a flag file (`jobs/<id>/cancel`, written by `appliance jobs cancel` or by
the job's own SIGTERM handler). Code that runs in steps checks the flag itself and stops at a safe
point: the training loop saves a checkpoint first. Much of a job cannot check: a model load inside
transformers, a wait on llama.cpp's converter, a hash of a 15 GB file. While a job runs, a watcher
thread therefore looks at the flag a few times a second and, when the job is in such a phase,
sends `INTERRUPT` to the main thread, whose handler raises `JobCancelled` there (a blocking call
such as a sleep or a wait on a child returns at once with it; a long computation inside C code
ends its current call first).

`JobCancelled` is a BaseException, as KeyboardInterrupt is, for the same reason: the code it
interrupts is often library code that says `except Exception:` (skip a bad GGUF field, try the
next template) and would otherwise swallow it. Cleanup (`finally`, `except BaseException: ...;
raise`) still runs, and the handler raises only once per job, so that cleanup is not cut again.

The main thread is in one of three modes. Outside `armed` (no job running here) nothing is ever
interrupted. Inside it, a phase is interruptible unless it is `deferred`: a cooperative section
that checks the flag itself (the training loop) or a section that must not be cut (a commit), or
the job is `finishing` (it commits its result, `JobContext.finishes_with`: a job is never
reported cancelled after that).

The watcher's reading of the mode can be stale: the main thread may enter a cooperative section
between the watcher's look and the handler's run. So the handler decides, in the main thread:
it raises only if the phase is interruptible when it runs, and otherwise declines; the watcher
sends again once the job is interruptible again (one interrupt in flight at a time). For the same
reason the watcher stops the job's child processes only after the handler has actually raised
(`interrupted`), never on its own reading: a child of a cooperative section (torchrun, whose
workers see the flag themselves) is that section's to stop. Once the handler raised, the job is
ending, and its children in its session that were not there when it began are stopped (SIGTERM,
SIGKILL 10 s later); a job it started detached has a session of its own and goes on. (So a wait
on a child must let the handler run: Python's waits and reads do, retrying after EINTR only once
the handler has run; a C library that retried the wait by itself would wait for the child.)

Why an interrupt cannot corrupt anything: artifacts are written in a staging directory and renamed
into place (`appliance.workspace`), so an exception anywhere before the rename leaves the previous
state and the staging directory is removed; checkpoints are written (to a `.tmp` directory, then
renamed) only inside the training loop's cooperative section, which is never interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

INTERRUPT = signal.SIGUSR1
POLL_S = 0.2  # how often the watcher looks at the flag
TERM_GRACE_S = 10.0  # a child that ignores SIGTERM this long gets SIGKILL


class JobCancelled(BaseException):
    """Raised inside a job function when a cancel was asked for (after it saved its state).

    A BaseException, like KeyboardInterrupt: `except Exception` in the code it interrupts must not
    swallow it. Catch it by name."""


class _Main:
    """The main thread's mode (read by the watcher, changed only by the main thread, but for
    `pending`, which the watcher sets and the handler clears)."""

    armed = False
    deferred = 0
    finishing = False
    interrupted = False  # the handler raised JobCancelled in this job (it does so once)
    pending = False  # an interrupt was sent and the handler has not run for it yet


_main = _Main()


def interruptible() -> bool:
    return _main.armed and not _main.deferred and not _main.finishing


def interrupted() -> bool:
    """Whether the running job was interrupted (then any exception it ends with is the cancel's
    doing: a converter stopped under it, an error raised while it unwound)."""
    return _main.interrupted


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    """Raise in the main thread if, now, the phase may be cut; else decline (the watcher sends
    again when it may). Once per job: the cleanup the raise sets off is not cut again."""
    _main.pending = False
    if interruptible() and not _main.interrupted:
        _main.interrupted = True
        raise JobCancelled()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that is not interrupted: it checks the cancel flag itself (cooperative), or must
    not be cut. Its child processes are its own to stop: the watcher leaves them alone."""
    _main.deferred += 1
    try:
        yield
    finally:
        _main.deferred -= 1


def finishing() -> None:
    """From here to the end of the job, nothing interrupts it: it commits its result."""
    _main.finishing = True


def child_pids(pid: int, *, session: int | None = None) -> list[int]:
    """The live child processes of `pid` (from /proc; zombies have exited already), only those
    of `session` when given (a job started detached has a session of its own: not ours to stop)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X") and session in (None, int(fields[3])):
            found.append(int(stat.parent.name))
    return found


def stop_children(spare: frozenset[int] = frozenset(), grace: float = TERM_GRACE_S) -> list[int]:
    """SIGTERM this process's children in its session (but `spare`), SIGKILL those still there
    after `grace` seconds."""
    me = os.getpid()
    children = [p for p in child_pids(me, session=os.getsid(0)) if p not in spare]
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := [p for p in child_pids(me) if p in children]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return children


class Watcher(threading.Thread):
    """Interrupts the main thread when the cancel flag appears while the job is interruptible;
    stops the job's children once the interrupt has been raised (see the module docstring)."""

    def __init__(self, flag: Path) -> None:
        super().__init__(name="cancel-watcher", daemon=True)
        self.flag, self.main = flag, threading.main_thread().ident
        self.done = threading.Event()
        self.spare = frozenset(child_pids(os.getpid()))  # there before the job: not its own

    def run(self) -> None:
        while not self.done.wait(POLL_S) and not _main.interrupted:
            if self.flag.exists() and interruptible() and not _main.pending:
                _main.pending = True
                assert self.main is not None
                signal.pthread_kill(self.main, INTERRUPT)
        if _main.interrupted:  # the job is unwinding: a wait on a child returns, none is left
            stop_children(self.spare)


@contextlib.contextmanager
def armed(flag: Path) -> Iterator[None]:
    """Run a job's function inside: a cancel (`flag` appearing) interrupts it where it is, except
    in deferred sections. Main thread only (signal handlers live there)."""
    previous = signal.signal(INTERRUPT, _on_interrupt)
    watcher = Watcher(flag)
    _main.armed, _main.deferred, _main.finishing = True, 0, False
    _main.interrupted = _main.pending = False
    watcher.start()
    try:
        yield
    finally:
        _main.armed = False
        watcher.done.set()
        watcher.join()
        signal.signal(INTERRUPT, previous)
