"""Offline by construction: the guard every entry point installs before doing anything else.

`install()` does two things:
1. sets the Hugging Face / transformers offline and no-telemetry variables, so libraries that honour
   them never try the network;
2. wraps the socket layer so that resolving a non-local host name, or connecting / sending to an
   address that is not loopback, raises `NetworkBlockedError` naming the code that tried. Loopback
   (127.0.0.0/8, ::1, "localhost") and Unix sockets stay allowed: the API server and its tests use
   them.

`NetworkBlockedError` is deliberately *not* an `OSError`: HTTP client libraries catch `OSError` and
turn it into retries or "falling back to cache" messages; an error of another type goes straight up
to the operator with its message intact.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "BITSANDBYTES_NOWELCOME": "1",
    # ONNX Runtime (1.31, Linux) starts Microsoft's 1DS telemetry in native threads: a device id and
    # an event store under ~/.cache/Microsoft/DeveloperTools, then DNS lookups and uploads to
    # mobile.events.data.microsoft.com while a session lives (Python's socket guard cannot see
    # native code). Its opt-out is read once, when the runtime starts: set here, before any import,
    # and inherited by every child. Both spellings (versions differ). docs/PITFALLS.md, "Telemetry".
    "ORT_DISABLE_TELEMETRY": "1",
    "ORT_TELEMETRY_DISABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Frames inside these modules are plumbing; the "caller" we name is the first frame outside them.
_PLUMBING = (
    "socket", "ssl", "selectors", "asyncio", "http", "urllib", "urllib3", "requests", "httpx",
    "httpcore", "aiohttp", "anyio", "appliance.offline", "contextlib", "concurrent", "threading",
)

_lock = threading.Lock()
_originals: dict[str, Callable[..., Any]] = {}
blocked_attempts: list[str] = []


class NetworkBlockedError(RuntimeError):
    """A connection to a non-loopback address was attempted while the appliance is offline."""

    title = "Network access blocked"


def _is_plumbing(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in _PLUMBING)


def _caller() -> str:
    """Name the innermost frame outside networking plumbing, plus the chain that led to it."""
    frame: FrameType | None = sys._getframe(2)
    chain: list[str] = []
    while frame is not None:
        module = frame.f_globals.get("__name__", "?")
        if not _is_plumbing(module):
            where = f"{module}.{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
            chain.append(where)
            if len(chain) == 3:
                break
        frame = frame.f_back
    return " <- ".join(chain) if chain else "unknown caller"


def is_local_host(host: object) -> bool:
    """True for loopback IPs, 'localhost' names, Unix socket paths and the wildcard (bind) address."""
    if host is None or isinstance(host, bytes | bytearray):
        return host is None or bytes(host) in (b"localhost", b"")
    if not isinstance(host, str):
        return False
    name = host.strip("[]").split("%")[0].lower()
    if name in ("", "localhost") or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _refuse(what: str, target: object) -> None:
    message = (
        f"appliance is offline: refused to {what} {target!r}. Caller: {_caller()}. "
        "Models and data must come from local paths; nothing is fetched at run time."
    )
    blocked_attempts.append(message)
    raise NetworkBlockedError(message)


def _check_address(sock: socket.socket, address: Any, what: str) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # Unix sockets, netlink, ...
    host = address[0] if isinstance(address, tuple) and address else address
    if not is_local_host(host):
        _refuse(what, address)


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    _check_address(self, address, "connect to")
    return _originals["connect"](self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> Any:
    _check_address(self, address, "connect to")
    return _originals["connect_ex"](self, address)


def _guarded_sendto(self: socket.socket, data: Any, *args: Any) -> Any:
    _check_address(self, args[-1], "send to")
    return _originals["sendto"](self, data, *args)


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if not is_local_host(host):
        _refuse("resolve", host)
    return _originals["getaddrinfo"](host, *args, **kwargs)


def set_offline_env(environ: dict[str, str] | None = None) -> None:
    """Force the offline/no-telemetry variables (children inherit them)."""
    target = os.environ if environ is None else environ
    target.update(OFFLINE_ENV)


def install() -> None:
    """Install the guard (idempotent). Call first thing in every entry point."""
    set_offline_env()
    # on an AVX512-BF16 CPU bitsandbytes asks the `kernels` package for a kernel from the hub as it
    # is imported: that package is not installed (and the hub is off), so its warning, printed in
    # every training job's log, told an operator to install something that would go online
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with _lock:
        if _originals:
            return
        _originals["connect"] = socket.socket.connect
        _originals["connect_ex"] = socket.socket.connect_ex
        _originals["sendto"] = socket.socket.sendto
        _originals["getaddrinfo"] = socket.getaddrinfo
        # Patching the methods of the class is the point; the wrappers take any address (Any).
        socket.socket.connect = _guarded_connect  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign,assignment]
        socket.socket.sendto = _guarded_sendto  # type: ignore[method-assign,assignment]
        socket.getaddrinfo = _guarded_getaddrinfo


def installed() -> bool:
    return bool(_originals)


def status() -> dict[str, Any]:
    """What `doctor` reports about offline mode."""
    env_ok = all(os.environ.get(k) == v for k, v in OFFLINE_ENV.items())
    return {
        "guard_installed": installed(),
        "offline_env": env_ok,
        "missing_env": sorted(k for k, v in OFFLINE_ENV.items() if os.environ.get(k) != v),
        "blocked_attempts": len(blocked_attempts),
    }


def connects_beyond_loopback(strace_output: str) -> list[str]:
    """The lines of `strace -e trace=connect` output that connect to anything but a local socket
    or loopback (127.0.0.0/8, ::1): how the offline-kit test and bench prove a whole install and
    run stayed on the box, below the guard (pip, llama.cpp's C code, child processes)."""
    bad = []
    for line in strace_output.splitlines():
        if "connect(" not in line or "AF_UNIX" in line or "AF_NETLINK" in line:
            continue
        found = (re.search(r'inet_addr\("([\d.]+)"\)', line)
                 or re.search(r'inet_pton\(AF_INET6, "([^"]+)"', line))
        address = found.group(1).removeprefix("::ffff:") if found else ""
        if address and is_local_host(address):
            continue
        bad.append(line)
    return bad
