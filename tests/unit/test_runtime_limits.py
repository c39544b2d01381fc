"""The server's connection rules that need no socket: the rate-limited rejection log (at most one
line per rejection, a summary past the burst), fitting the connection cap to the file-descriptor
limit, accept errors as one line, and the logging set-up of `--log-level`."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator

import pytest

from appliance.runtime import limits
from appliance.runtime.limits import RejectLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay: float, fn: Callable[[], None]) -> None:
        self.pending.append((self.now + delay, fn))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [fn for at, fn in self.pending if at <= self.now]
        self.pending = [(at, fn) for at, fn in self.pending if at > self.now]
        for fn in due:
            fn()


def test_rejections_past_the_burst_become_one_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RejectLog(logging.getLogger("t.rejects"), burst=3, interval=10.0, clock=clock,
                    schedule=clock.schedule)
    caplog.set_level(logging.INFO, logger="t.rejects")
    for i in range(1000):
        log("per_client_limit", f"127.0.0.{i % 5}", "too many connections")
    assert len(caplog.records) == 3
    clock.advance(10.0)  # the window ends: one line sums up the rest
    assert len(caplog.records) == 4
    summary = caplog.records[-1].getMessage()
    assert "997" in summary and "per_client_limit" in summary
    clock.advance(60.0)
    log("header_timeout", "127.0.0.9", "head not complete within 10 s")
    assert len(caplog.records) == 5 and "header_timeout" in caplog.records[-1].getMessage()
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in caplog.records)


def test_lines_never_outnumber_rejections(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RejectLog(logging.getLogger("t.few"), burst=2, interval=1.0, clock=clock, schedule=clock.schedule)
    caplog.set_level(logging.INFO, logger="t.few")
    count = 0
    for step in range(200):
        for _ in range(step % 4):
            log("bad_request", "c", "x")
            count += 1
        clock.advance(0.37)
    clock.advance(5)
    assert 0 < len(caplog.records) <= count


def test_the_cap_fits_the_file_descriptor_limit() -> None:
    margin = limits.fd_margin(limits.BACKLOG)
    now = {"soft": 1024, "hard": 4096}

    def get() -> tuple[int, int]:
        return now["soft"], now["hard"]

    def set_(soft: int, hard: int) -> None:
        now["soft"] = soft

    assert limits.fit_connections(100, open_fds=20, getrlimit=get, setrlimit=set_) == \
        (100, limits.BACKLOG, None)
    assert now["soft"] == 1024  # enough already: left alone
    cap, _, note = limits.fit_connections(2000, open_fds=20, getrlimit=get, setrlimit=set_)
    assert (cap, note) == (2000, None) and now["soft"] == 2000 + 20 + margin  # raised to what it needs
    now.update(soft=256, hard=256)  # the box: 256 descriptors, no way up
    cap, backlog, note = limits.fit_connections(1024, open_fds=20, getrlimit=get, setrlimit=set_)
    assert backlog < limits.BACKLOG and cap == 256 - 20 - limits.fd_margin(backlog) > 0
    assert note and "LimitNOFILE" in note and "1024" in note
    assert limits.fit_connections(0, open_fds=20, getrlimit=get, setrlimit=set_)[0] == 0  # 0: no cap
    assert margin < limits.FD_RESERVE  # the unit's limit leaves room for the process's own files


def test_accept_errors_are_one_rejection_line_not_a_traceback() -> None:
    seen: list[tuple[str, str, str]] = []
    handler = limits.accept_errors(lambda *a: seen.append(a))
    passed: list[dict] = []

    class Loop:
        def default_exception_handler(self, context: dict) -> None:
            passed.append(context)

    handler(Loop(), {"message": "socket.accept() out of system resource",
                     "exception": OSError(errno.EMFILE, "Too many open files")})
    assert seen and seen[0][0] == "accept_failed" and "Too many open files" in seen[0][2]
    handler(Loop(), {"message": "something else", "exception": ValueError("x")})
    assert len(passed) == 1 and len(seen) == 1


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger("appliance")
    saved = (root.level, list(root.handlers), ours.level)
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    ours.setLevel(saved[2])


def test_log_level_setting(restore_logging: None) -> None:
    limits.configure_logging("warning")
    assert not logging.getLogger("appliance.access").isEnabledFor(logging.INFO)
    assert logging.getLogger("appliance.connections").isEnabledFor(logging.WARNING)
    limits.configure_logging("info")
    assert logging.getLogger("appliance.access").isEnabledFor(logging.INFO)
    limits.configure_logging("info")  # again: still one handler of ours
    assert sum(getattr(h, "appliance", False) for h in logging.getLogger().handlers) == 1
    with pytest.raises(ValueError):
        limits.configure_logging("loud")
