"""The audit trail: keyed and chained lines, the head in SQLite, and `verify` naming the line and
the check for each kind of tampering (edit, removal, insertion, copy, reorder, truncation)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import audit
from appliance.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]


def _log(ws: Workspace) -> Path:
    return ws.root / "audit.log"


def _lines(ws: Workspace) -> list[bytes]:
    return _log(ws).read_bytes().splitlines(keepends=True)


def _write(ws: Workspace, lines: list[bytes]) -> None:
    _log(ws).write_bytes(b"".join(lines))


def _checks(ws: Workspace) -> list[tuple[int, str]]:
    return [(f.line, f.check) for f in audit.verify(ws.root, ws.connect).findings]


@pytest.fixture
def ten(workspace: Workspace) -> Workspace:
    workspace.ensure()
    for i in range(1, 11):
        workspace.audit("note", n=i)
    return workspace


def test_each_line_carries_number_user_chain_and_mac(ten: Workspace) -> None:
    entries = [json.loads(line) for line in _lines(ten)]
    assert [e["seq"] for e in entries] == list(range(1, 11))
    assert all(e["user"] == audit.os_user() and e["event"] == "note" for e in entries)
    raw = [line.rstrip(b"\n") for line in _lines(ten)]
    assert [e["prev"] for e in entries] == ["0" * 64] + [hashlib.sha256(r).hexdigest() for r in raw[:-1]]
    key = (ten.root / ".secrets" / "audit.key").read_bytes()
    assert all(audit.mac_ok(key, r) for r in raw)
    assert (ten.root / ".secrets" / "audit.key").stat().st_mode & 0o777 == 0o600
    verdict = audit.verify(ten.root, ten.connect)
    assert verdict.ok and verdict.lines == 10 and verdict.head is not None and verdict.head.lines == 10


def test_an_edited_line_is_found_at_its_line(ten: Workspace) -> None:
    lines = _lines(ten)
    lines[4] = lines[4].replace(b'"n":5', b'"n":6')
    _write(ten, lines)
    assert _checks(ten) == [(5, "edited")]


def test_an_edited_last_line_is_found(ten: Workspace) -> None:
    lines = _lines(ten)
    lines[9] = lines[9].replace(b'"n":10', b'"n":11')
    _write(ten, lines)
    assert (10, "edited") in _checks(ten)


def test_a_removed_line_is_found_where_it_was(ten: Workspace) -> None:
    lines = _lines(ten)
    del lines[3]
    _write(ten, lines)
    found = audit.verify(ten.root, ten.connect).findings
    assert next((f.line, f.check) for f in found) == (4, "removed")
    assert "line 4 as written" in found[0].message


def test_an_inserted_line_is_found(ten: Workspace) -> None:
    lines = _lines(ten)
    forged = json.loads(lines[2])
    forged["n"] = 99
    lines.insert(3, (json.dumps(forged, sort_keys=True) + "\n").encode())
    _write(ten, lines)
    assert _checks(ten)[0] == (4, "inserted")


def test_a_copied_line_is_found(ten: Workspace) -> None:
    lines = _lines(ten)
    lines.insert(6, lines[2])
    _write(ten, lines)
    assert _checks(ten)[0] == (7, "copied")


def test_reordered_lines_are_found(ten: Workspace) -> None:
    lines = _lines(ten)
    lines[5], lines[6] = lines[6], lines[5]
    _write(ten, lines)
    assert _checks(ten) == [(6, "reordered"), (7, "reordered")]


def test_truncation_is_found_from_the_head(ten: Workspace) -> None:
    _write(ten, _lines(ten)[:8])
    found = audit.verify(ten.root, ten.connect).findings
    assert [(f.line, f.check) for f in found] == [(8, "head")]
    assert "recorded 10 lines" in found[0].message


def test_a_rewritten_chain_without_the_key_fails(ten: Workspace) -> None:
    """Someone who can write the file but not read the key recomputes the chain: every MAC fails."""
    prev, out = "0" * 64, []
    for line in _lines(ten):
        entry = json.loads(line)
        entry.pop("mac")
        entry["prev"] = prev
        raw = audit.seal(b"not the key", entry)
        out.append(raw + b"\n")
        prev = hashlib.sha256(raw).hexdigest()
    _write(ten, out)
    assert {check for _, check in _checks(ten)} >= {"edited"}


def test_a_tampered_tail_is_recorded_by_the_next_append(ten: Workspace) -> None:
    """Truncating and then appending does not heal the log: the append records the mismatch first."""
    _write(ten, _lines(ten)[:7])
    ten.audit("note", n=11)
    lines = [json.loads(line) for line in _lines(ten)]
    assert lines[7]["event"] == "audit-mismatch" and lines[7]["expected"]["lines"] == 10
    assert lines[8]["event"] == "note" and lines[8]["seq"] == 9
    checks = _checks(ten)
    assert checks == [(8, "mismatch")]


def test_lines_from_before_keying_are_accepted_at_the_start(workspace: Workspace) -> None:
    workspace.ensure()
    prev, old = "0" * 64, []
    for i in range(3):  # the format of earlier versions: no seq, user or mac
        raw = json.dumps({"event": "commit", "prev": prev, "ts": "2026-01-01", "n": i},
                         sort_keys=True).encode()
        old.append(raw + b"\n")
        prev = hashlib.sha256(raw).hexdigest()
    _write(workspace, old)
    workspace.audit("note", n=3)
    verdict = audit.verify(workspace.root, workspace.connect)
    assert verdict.ok and verdict.unkeyed == 3 and verdict.lines == 4
    assert json.loads(_lines(workspace)[3])["seq"] == 4


def test_a_missing_key_is_said(ten: Workspace) -> None:
    (ten.root / ".secrets" / "audit.key").unlink()
    found = audit.verify(ten.root, ten.connect).findings
    assert found and "audit key" in found[0].message


APPENDER = """
import sys
from pathlib import Path
from appliance.workspace import Workspace
ws = Workspace(Path(sys.argv[1]))
for i in range(60):
    ws.audit("note", writer=sys.argv[2], n=i)
"""


def test_two_processes_appending_at_once_keep_the_chain(workspace: Workspace) -> None:
    workspace.ensure()
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(workspace.root), name],
                              cwd=REPO) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    verdict = audit.verify(workspace.root, workspace.connect)
    assert verdict.ok and verdict.lines == 120


def test_show_filters_by_action_user_and_time(ten: Workspace) -> None:
    ten.audit("key-create", id="k1")
    assert [e["id"] for e in audit.entries(ten.root, action="key-create")] == ["k1"]
    assert len(list(audit.entries(ten.root, user=audit.os_user()))) == 11
    assert list(audit.entries(ten.root, user="nobody-else")) == []
    assert list(audit.entries(ten.root, since="9999")) == []
    assert all("mac" not in e for e in audit.entries(ten.root))


def test_reserved_field_names_are_refused(workspace: Workspace) -> None:
    workspace.ensure()
    with pytest.raises(ValueError, match="seq"):
        workspace.audit("note", seq=3)
