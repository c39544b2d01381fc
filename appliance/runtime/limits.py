"""The server's connection limits, its rejection log and its logging set-up: standard library only,
so the CLI (`serve --help`) and the systemd unit renderer read the defaults without aiohttp.

Why these defaults: a client that connects and sends nothing, or a header line every few seconds,
costs the server a socket and a file descriptor until it gives up. Without limits 3,000 such
connections took every descriptor of a 256-descriptor process, `accept()` failed and paused, and a
real request waited 17.7 s (issue 12). So every connection has a deadline (the idle timeout before
and between requests, the header timeout once a request head starts, the body timeout while a body
arrives), a client (an IPv4 address, or an IPv6 /64) may hold `max_connections_per_client`, and
the server at most `max_connections`; at either cap a new connection closes the connection (of
that client, or of anyone) that has waited the longest, and is refused with 503 only when all are
busy with requests, so one local program cannot lock out the others on 127.0.0.1. The cap
is kept below the process's descriptor limit (`fit_connections`), and the systemd unit sets
`LimitNOFILE` to the cap plus `FD_RESERVE`, so the cap is what is reached, never the limit.

Rejections are logged one line each up to a burst per interval, then summed up in one line at the
interval's end (`RejectLog`): a flood of bad clients can never grow the log faster than one line
per rejection, and usually far slower. `accept()` errors from asyncio become such lines too,
instead of a traceback each.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds for a whole request head, from its first byte
DEFAULT_IDLE_TIMEOUT = 15.0  # seconds a connection may wait for its (next) request
DEFAULT_BODY_TIMEOUT = 30.0  # seconds for a request body, once its head has come
DEFAULT_MAX_CONNECTIONS = 1024  # in total
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 64  # per IPv4 address or IPv6 /64 (a reverse proxy is one
# client: beyond it, the client's own longest-waiting connection makes room)
MAX_HEAD_BYTES = 32 * 1024  # a request line and headers together (OpenAI clients send < 2 KiB)
BACKLOG = 128  # the listen queue, and how many sockets asyncio accepts in one go


def fd_margin(backlog: int) -> int:
    """Descriptors to keep free beyond the cap and those open at start: asyncio accepts up to
    `backlog` sockets at a time before any is admitted, refused or closed, and a few such bursts
    can overlap; plus a database check and a log file."""
    return 4 * backlog + 64


FD_RESERVE = fd_margin(BACKLOG) + 192  # what the unit's LimitNOFILE adds to the cap (192: the
# process's own files: models, database, threads, logs; about 20 when serving one model)
LOG_LEVELS = ("debug", "info", "warning", "error")
REJECT_BURST = 10  # rejection lines per interval before they are summed up
REJECT_INTERVAL = 10.0
ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

log = logging.getLogger("appliance.connections")


class RejectLog:
    """One warning line per rejected connection or request, `burst` per `interval` at most; the
    rest are counted by reason and written as one line when the interval ends."""

    def __init__(self, logger: logging.Logger = log, *, burst: int = REJECT_BURST,
                 interval: float = REJECT_INTERVAL, clock: Callable[[], float] = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self.logger, self.burst, self.interval = logger, burst, interval
        self.clock, self.schedule = clock, schedule
        self.window_end = float("-inf")
        self.written = 0
        self.held: Counter[str] = Counter()
        self.flush_pending = False

    def __call__(self, reason: str, client: str, detail: str) -> None:
        now = self.clock()
        if now >= self.window_end:
            self.flush()
            self.window_end, self.written = now + self.interval, 0
        if self.written < self.burst:
            self.written += 1
            self.logger.warning("rejected %s from %s: %s", reason, client or "-", detail)
            return
        self.held[reason] += 1
        if not self.flush_pending and self.schedule is not None:
            self.flush_pending = True
            self.schedule(max(self.window_end - now, 0.0), self.flush)

    def flush(self) -> None:
        """Write the summary of what was held back (nothing when nothing was)."""
        self.flush_pending = False
        if not self.held:
            return
        total = sum(self.held.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.held.most_common())
        self.logger.warning("rejected %d more in the last %.0f s (%s); per-reason totals: "
                            "appliance_connections_rejected_total in /metrics", total, self.interval,
                            reasons)
        self.held.clear()


def fit_connections(cap: int, *, open_fds: int | None = None,
                    getrlimit: Callable[[], tuple[int, int]] | None = None,
                    setrlimit: Callable[[int, int], None] | None = None
                    ) -> tuple[int, int, str | None]:
    """(cap, backlog, note) this process can keep: the soft descriptor limit is raised (up to the
    hard one) to hold the cap, what is open now and `fd_margin`; under a lower limit the backlog,
    then the cap, shrink to fit, and the note says so. A cap of 0 (none) is left alone."""
    if cap <= 0 or not sys.platform.startswith("linux"):
        return cap, BACKLOG, None
    import resource

    infinite = resource.RLIM_INFINITY
    get = getrlimit or (lambda: resource.getrlimit(resource.RLIMIT_NOFILE))
    set_ = setrlimit or (lambda soft, hard: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
    used = _open_fds() if open_fds is None else open_fds
    soft, hard = get()
    need = cap + used + fd_margin(BACKLOG)
    if soft != infinite and soft < need:
        target = need if hard == infinite else min(need, hard)
        try:
            set_(target, hard)
            soft = target
        except (OSError, ValueError):
            pass
    if soft == infinite or soft >= need:
        return cap, BACKLOG, None
    backlog = max(8, min(BACKLOG, soft // 16))
    fitted = min(cap, max(soft - used - fd_margin(backlog), 1))
    if fitted == cap:
        return cap, backlog, None
    return fitted, backlog, (f"the file-descriptor limit is {soft}: at most {fitted} connections "
                             f"instead of {cap} (raise it: LimitNOFILE={cap + FD_RESERVE} in the "
                             "unit, or ulimit -n)")


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def accept_errors(reject: Callable[[str, str, str], None]) -> Callable[[Any, dict[str, Any]], None]:
    """An event-loop exception handler: `accept()` failing for want of descriptors or memory is a
    rejection line (asyncio would log a traceback each time); anything else goes on as before."""

    def handle(loop: Any, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS:
            reject("accept_failed", "-", f"{context.get('message', 'accept() failed')}: "
                                         f"{exc.strerror or exc}")
            return
        loop.default_exception_handler(context)

    return handle


class _Handler(logging.StreamHandler[TextIO]):
    appliance = True  # ours: configure_logging replaces it rather than adding another


def configure_logging(level: str) -> None:
    """The server process's logging: one line per record on stderr (journald adds the time under
    systemd; a job's output.log keeps it), `level` for the appliance's loggers (the access log is
    INFO), warnings and errors from libraries."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r}: one of {', '.join(LOG_LEVELS)}")
    value = getattr(logging, level.upper())
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "appliance", False)]
    handler = _Handler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(value, logging.WARNING))
    logging.getLogger("appliance").setLevel(value)
