"""Small filesystem primitives the workspace is built on: atomic writes, hashing, locks, and what a
full disk means.

An atomic write goes to a temporary file in the same directory, is fsynced, then renamed over the
target, so a reader sees the old content or the new one, never half of either.

A full disk surfaces in many shapes: OSError ENOSPC/EDQUOT, safetensors' SafetensorError carrying
"No space left on device", torch's "file write failed", SQLite's SQLITE_FULL or a bare "disk I/O
error". `is_disk_full` recognises them and `disk_full_error` turns them into one DiskFullError,
"disk full at PATH: free N MB", so the workspace layer (atomic writes here, the artifact writer and
the database connection in appliance.workspace) translates them once for every command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, DiskFullError

CHUNK = 1 << 20
PRIVATE_MASK = 0o700  # what the workspace keeps of a mode: its owner's bits only
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the libraries that do not raise OSError put ENOSPC into their messages.
DISK_FULL_TEXT = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded",
                  "database or disk is full")
FREE_HINT = ("free space on that filesystem (remove runs, exports or models you no longer need; "
             "`appliance doctor --clean` removes unfinished writes), or move the workspace to a "
             "bigger disk (APPLIANCE_HOME)")


# -- a full disk ------------------------------------------------------------------------------------
def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path` (or its nearest
    existing parent); -1 where that cannot be read."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return -1


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it came from) says the disk or quota is full."""
    for item in _chain(exc):
        if isinstance(item, DiskFullError):
            return True
        if isinstance(item, OSError) and item.errno in DISK_FULL_ERRNOS:
            return True
        if getattr(item, "sqlite_errorname", None) == "SQLITE_FULL":
            return True
        if isinstance(item, ApplianceError):
            continue  # our own messages may quote user text that merely mentions a full disk
        if any(t in str(item) for t in DISK_FULL_TEXT):
            return True
    return False


def disk_full_error(path: Path, what: str = "", *, hint: str = FREE_HINT) -> DiskFullError:
    """`disk full at PATH: free N MB`, with what could not be written, and what to do."""
    free = free_bytes(path)
    shown = f"{free // 10**6} MB" if free >= 0 else "unknown"
    tail = f" ({what})" if what else ""
    return DiskFullError(f"disk full at {path}: free {shown}{tail}", hint=hint)


@contextlib.contextmanager
def disk_full_as_error(path: Path, what: str = "") -> Iterator[None]:
    """Turn a full disk inside the block into DiskFullError naming `path`; other errors pass."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(path, what) from exc


# -- modes --------------------------------------------------------------------------------------------
def make_private(path: Path, *, recursive: bool = True) -> None:
    """Drop group and other permission bits from `path` (and, recursively, what is under it).
    Links are not followed; entries this process may not change are left as they are."""

    def tighten(p: str) -> None:
        try:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & ~PRIVATE_MASK:
                os.chmod(p, stat.S_IMODE(st.st_mode) & PRIVATE_MASK)
        except OSError:
            pass

    tighten(os.fspath(path))
    if recursive and os.path.isdir(path) and not os.path.islink(path):
        for top, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                tighten(os.path.join(top, name))


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where
    the kernel, libc or filesystem cannot; the caller then falls back to two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    import errno

    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP):
        return False  # not supported here: the caller's fallback
    raise OSError(code, f"swapping {a} and {b}: {os.strerror(code)}")


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (no bytes copied; artifact files are never modified in place), or a
    copy where links are not possible."""
    with disk_full_as_error(dst.parent, f"writing {dst.name}"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise
            shutil.copy2(src, dst)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a 0600 file: mkstemp's mode survives the rename)."""
    with disk_full_as_error(path.parent, f"writing {path.name}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON lines (used inside a staging directory, so no rename dance is needed)."""
    with disk_full_as_error(path.parent, f"writing {path.name}"), \
            open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class FileLock:
    """An exclusive, non-blocking advisory lock (flock). The kernel drops it if the holder dies,
    so a killed process never leaves a lock that blocks the next one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        with contextlib.suppress(OSError):  # the pid is for messages only: a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def blocking_lock(path: Path) -> Iterator[None]:
    """A short critical section shared between processes (e.g. appending to the audit log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
