"""The audit trail: one JSON line per state-changing action, keyed and chained, checked end to end.

Each line carries its number (`seq`), the time, the OS user, the action (`event`), the subjects
(artifact kind and name, job id, key id...), the sha256 of the line before it (`prev`) and, last,
an HMAC-SHA256 of everything before it (`mac`) under a key that only the workspace's owner can read
(`.secrets/audit.key`, 0600 in a 0700 folder). So:

- an edited, inserted, removed or reordered line is found by `verify` at its line: the MAC fails
  (edit, forged insert), or the numbers skip (removal), repeat (a replayed copy) or go back
  (reorder); anyone who can write the file but not read the key cannot recompute a valid chain;
- the last line and truncation are covered too: the head (line count, byte size, last line's hash)
  is also kept in SQLite and checked before every append. A log that does not match its head is
  not healed silently: the next append first writes an `audit-mismatch` line that says what was
  expected and what was found, and `verify` reports it.

Appends are serialised between processes by a file lock (two processes appending at once keep the
chain valid). Lines written before keying (no `seq`/`mac`) are accepted at the start of a log and
counted as unkeyed; their hash chain is still checked. Prompts and answers are never logged here.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import manifest
from appliance.fsutil import blocking_lock, disk_full_as_error

LOG = "audit.log"
SECRETS = ".secrets"
KEY_FILE = "audit.key"
ZERO = "0" * 64
MAC_TAIL = len(b',"mac":"') + 64 + len(b'"}')
RESERVED = frozenset({"seq", "ts", "user", "event", "prev", "mac"})
HEAD_SQL = """
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    lines INTEGER NOT NULL,
    size INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Head:
    lines: int
    size: int
    hash: str


@dataclass(frozen=True)
class Finding:
    line: int  # 1-based; 0 for the log as a whole
    check: str  # edited | inserted | removed | reordered | copied | chain | format | head | mismatch
    message: str


@dataclass
class Verdict:
    lines: int
    unkeyed: int
    head: Head | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _secrets_dir(root: Path) -> Path:
    path = root / SECRETS
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def load_key(root: Path, *, create: bool = True) -> bytes | None:
    """The workspace's audit key: 32 random bytes, made once, readable by the owner only."""
    path = root / SECRETS / KEY_FILE
    if not path.exists():
        if not create:
            return None
        _secrets_dir(root)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(32))
                os.fsync(fd)
            finally:
                os.close(fd)
    return path.read_bytes()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _mac(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def seal(key: bytes, entry: dict[str, Any]) -> bytes:
    """One line (no newline): the entry as sorted JSON with the MAC of that JSON appended last."""
    body = json.dumps(entry, sort_keys=True, default=str, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")
    return body[:-1] + b',"mac":"' + _mac(key, body).encode() + b'"}'


def mac_ok(key: bytes, line: bytes) -> bool | None:
    """True/False for a keyed line's MAC; None for a line that has none (written before keying)."""
    if len(line) < MAC_TAIL or not line.endswith(b'"}') or line[-MAC_TAIL:-66] != b',"mac":"':
        return None
    body = line[:-MAC_TAIL] + b"}"
    return hmac.compare_digest(_mac(key, body).encode(), line[-66:-2])


# -- the head in SQLite -----------------------------------------------------------------------------
def read_head(db: Any) -> Head | None:
    db.executescript(HEAD_SQL)
    row = db.execute("SELECT lines, size, hash FROM audit_head WHERE id = 1").fetchone()
    return Head(*row) if row else None


def _write_head(db: Any, head: Head) -> None:
    db.execute("INSERT OR REPLACE INTO audit_head(id, lines, size, hash) VALUES (1, ?, ?, ?)",
               (head.lines, head.size, head.hash))


# -- reading the file ------------------------------------------------------------------------------
def _line_ending_at(path: Path, end: int) -> bytes | None:
    """The line whose newline is the byte before `end` (None if there is none such)."""
    if end <= 0:
        return None
    with open(path, "rb") as fh:
        fh.seek(end - 1)
        if fh.read(1) != b"\n":
            return None
        window = 4096
        while True:
            start = max(0, end - 1 - window)
            fh.seek(start)
            chunk = fh.read(end - 1 - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return chunk[cut + 1:]
            if start == 0:
                return chunk
            window *= 4


def _count_lines(path: Path, start: int = 0) -> int:
    count = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while block := fh.read(1 << 20):
            count += block.count(b"\n")
    return count


def iter_lines(path: Path) -> Iterator[bytes]:
    """The log's lines, each with its newline; a last line cut short is yielded without one."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        yield from fh


# -- appending -------------------------------------------------------------------------------------
def append(root: Path, connect: Any, event: str, fields: dict[str, Any]) -> None:
    """Append one keyed, chained line for `event` (see the module docstring)."""
    clash = RESERVED & fields.keys()
    if clash:
        raise ValueError(f"audit fields may not be named {sorted(clash)}")
    log = root / LOG
    undone = f"{event!r} was carried out, but its audit log entry could not be written"
    with blocking_lock(root / ".locks" / "audit.lock"), connect() as db:
        with disk_full_as_error(log, undone):
            key = load_key(root)
            assert key is not None
            head = read_head(db)
            seq, prev, mismatch = _position(log, head)
            lines = []
            if mismatch:
                lines.append(seal(key, {"seq": seq, "ts": manifest.now_iso(), "user": os_user(),
                                        "event": "audit-mismatch", "prev": prev, **mismatch}))
                seq, prev = seq + 1, line_hash(lines[-1])
            lines.append(seal(key, {"seq": seq, "ts": manifest.now_iso(), "user": os_user(),
                                    "event": event, "prev": prev, **fields}))
            size = _write(log, b"".join(line + b"\n" for line in lines))
        _write_head(db, Head(seq, size, line_hash(lines[-1])))


def _position(log: Path, head: Head | None) -> tuple[int, str, dict[str, Any] | None]:
    """(the next line's number, the hash it chains onto, a mismatch to record first or None)."""
    size = log.stat().st_size if log.exists() else 0
    last = _line_ending_at(log, size)
    if size and last is None:  # a cut last line: the next append would glue onto it
        _write(log, b"\n")
        size += 1
        last = _line_ending_at(log, size)
    if head is None or (size == head.size and last is not None and line_hash(last) == head.hash):
        count = head.lines if head else (_count_lines(log) if size else 0)
        return count + 1, line_hash(last) if last is not None else ZERO, None
    at_head = _line_ending_at(log, head.size) if size > head.size else None
    if at_head is not None and line_hash(at_head) == head.hash:  # appended after the head was saved
        count = head.lines + _count_lines(log, head.size)
        return count + 1, line_hash(last) if last is not None else ZERO, None
    count = _count_lines(log) if size else 0
    prev = line_hash(last) if last is not None else ZERO
    found = {"lines": count, "size": size, "hash": prev}
    expected = {"lines": head.lines, "size": head.size, "hash": head.hash}
    return count + 1, prev, {"expected": expected, "found": found}


def _write(log: Path, data: bytes) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # no half line to break the chain
                os.ftruncate(fd, size)
            raise
        return size + len(data)
    finally:
        os.close(fd)


# -- verifying -------------------------------------------------------------------------------------
@dataclass
class _Line:
    number: int
    raw: bytes
    entry: dict[str, Any] | None
    mac: bool | None
    chained: bool


def _scan(path: Path, key: bytes | None) -> tuple[list[_Line], list[Finding]]:
    lines: list[_Line] = []
    findings: list[Finding] = []
    prev = ZERO
    for number, raw in enumerate(iter_lines(path), 1):
        if not raw.endswith(b"\n"):
            findings.append(Finding(number, "format", f"line {number} is cut short (no newline)"))
        raw = raw.rstrip(b"\n")
        try:
            entry = json.loads(raw)
            entry = entry if isinstance(entry, dict) else None
        except ValueError:
            entry = None
        mac = mac_ok(key, raw) if key is not None else None
        chained = entry is not None and entry.get("prev") == prev
        lines.append(_Line(number, raw, entry, mac, chained))
        prev = line_hash(raw)
    return lines, findings


def verify(root: Path, connect: Any) -> Verdict:
    """Check every line of the log and its head; the findings name the line and the check."""
    log = root / LOG
    key = load_key(root, create=False)
    with connect() as db:
        head = read_head(db)
    lines, findings = _scan(log, key)
    unkeyed = _leading_unkeyed(lines)
    findings += _check_lines(lines, unkeyed, key)
    findings += _check_head(lines, head, log)
    findings.sort(key=lambda f: f.line)
    return Verdict(len(lines), unkeyed, head, findings)


def _leading_unkeyed(lines: list[_Line]) -> int:
    count = 0
    for line in lines:
        if line.mac is not None or (line.entry is not None and "seq" in line.entry):
            break
        count += 1
    return count


def _check_lines(lines: list[_Line], unkeyed: int, key: bytes | None) -> list[Finding]:
    findings: list[Finding] = []
    seqs = {line.entry.get("seq") for line in lines if line.entry and line.mac}
    seen: set[int] = set()
    expected = unkeyed + 1
    suspect_prev = False
    for line in lines:
        n = line.number
        if line.entry is None:
            findings.append(Finding(n, "format", f"line {n} is not a JSON object"))
            suspect_prev = True
            continue
        if n <= unkeyed:
            if not line.chained and not suspect_prev:
                findings.append(Finding(n, "chain", f"line {n} (written before keying) does not "
                                        "chain onto the line before it: edited, inserted or removed"))
            suspect_prev = not line.chained
            continue
        seq = line.entry.get("seq")
        if key is None or line.mac is not True:
            why = "has no MAC" if line.mac is None else "its MAC does not match its content"
            what = "edited" if seq == expected else "inserted"
            if key is None:
                why = "cannot be checked: the audit key (.secrets/audit.key) is missing"
            findings.append(Finding(n, what, f"line {n} {why}: {what}"))
            if seq == expected:
                expected += 1
            suspect_prev = True
            continue
        order = _check_order(line, seq, expected, seqs, seen, suspect_prev)
        findings += order
        if isinstance(seq, int):
            seen.add(seq)
            expected = max(expected, seq + 1)
        suspect_prev = bool(order)
        if line.entry.get("event") == "audit-mismatch":
            exp, got = line.entry.get("expected", {}), line.entry.get("found", {})
            findings.append(Finding(n, "mismatch", (
                f"line {n}: before this append the log did not match its recorded head "
                f"(expected {exp.get('lines')} lines of {exp.get('size')} bytes, found "
                f"{got.get('lines')} lines of {got.get('size')} bytes): lines were removed, "
                "edited or added at the end before it")))
    return findings


def _check_order(line: _Line, seq: Any, expected: int, seqs: set[Any], seen: set[int],
                 suspect_prev: bool) -> list[Finding]:
    n = line.number
    if not isinstance(seq, int):
        return [Finding(n, "format", f"line {n} has no line number (seq)")]
    if seq in seen:
        return [Finding(n, "copied", f"line {n} is a copy of line {seq} as written: inserted")]
    if seq > expected:
        missing = range(expected, seq)
        if all(m in seqs for m in missing):
            return [Finding(n, "reordered", f"line {n} was written as line {seq}: the lines are "
                            f"out of order (line {expected} as written comes later)")]
        span = f"line {expected}" if seq == expected + 1 else f"lines {expected}-{seq - 1}"
        return [Finding(n, "removed", f"{span} as written are missing before line {n}: removed")]
    if seq < expected:
        return [Finding(n, "reordered", f"line {n} was written as line {seq}: the lines are "
                        "out of order")]
    if not line.chained and not suspect_prev:
        return [Finding(n, "chain", f"line {n} does not chain onto the line before it")]
    return []


def _check_head(lines: list[_Line], head: Head | None, log: Path) -> list[Finding]:
    if head is None:
        return []
    count = len(lines)
    size = log.stat().st_size if log.exists() else 0
    last = line_hash(lines[-1].raw) if lines else ZERO
    if count < head.lines or size < head.size:
        return [Finding(count, "head", (
            f"the log ends at line {count} ({size} bytes), but the workspace recorded "
            f"{head.lines} lines ({head.size} bytes): the end was removed"))]
    if count == head.lines and last != head.hash:
        return [Finding(count, "head", f"line {count}, the last, is not the line the workspace "
                        "recorded last: edited or replaced")]
    if count > head.lines:
        at_head = _line_ending_at(log, head.size)
        if at_head is None or line_hash(at_head) != head.hash:
            return [Finding(head.lines, "head", f"line {head.lines} is not the line the "
                            "workspace recorded last: lines before it were changed")]
    return []


def parsed_lines(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(line number, the line as written, its JSON object) for every line that is one."""
    for number, raw in enumerate(iter_lines(path), 1):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield number, raw, entry


# -- reading for people ----------------------------------------------------------------------------
def entries(root: Path, *, since: str | None = None, user: str | None = None,
            action: str | None = None) -> Iterator[dict[str, Any]]:
    """The log's entries (without their MACs), filtered; `since` compares ISO times as text."""
    for number, _, entry in parsed_lines(root / LOG):
        entry.pop("mac", None)
        entry.setdefault("seq", number)
        if since and str(entry.get("ts", "")) < since:
            continue
        if user and entry.get("user") != user:
            continue
        if action and entry.get("event") != action:
            continue
        yield entry
