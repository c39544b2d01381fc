"""Reading a job's events file while it is written: byte offsets, half-written lines, bad lines,
and the tail a summary line reads."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.events import EventTail, last_events
from appliance.jobs import job_dir
from appliance.workspace import Workspace

JOB = "j1"


def _file(tmp_path: Path) -> tuple[Workspace, Path]:
    ws = Workspace(tmp_path)
    path = job_dir(ws, JOB) / "events.jsonl"
    path.parent.mkdir(parents=True)
    return ws, path


def _append(path: Path, data: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)


def _line(event: dict) -> str:
    return json.dumps(event) + "\n"


def test_a_missing_file_is_no_events_yet(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert EventTail(ws, JOB).read_from(7) == ([], 7)
    assert last_events(ws, JOB) == []


def test_reads_from_a_byte_offset_and_returns_the_next_one(tmp_path: Path) -> None:
    ws, path = _file(tmp_path)
    first, second = _line({"type": "state", "state": "running"}), _line({"type": "log", "message": "hi"})
    _append(path, first + second)
    tail = EventTail(ws, JOB)
    assert tail.read_from(0) == ([json.loads(first), json.loads(second)], len(first) + len(second))
    assert tail.read_from(len(first)) == ([json.loads(second)], len(first) + len(second))
    assert tail.offset == 0  # read_from is pure: dropping its result loses nothing
    assert len(tail.read()) == 2 and tail.read() == []
    _append(path, _line({"type": "progress", "done": 1, "total": 2}))
    assert tail.read() == [{"type": "progress", "done": 1, "total": 2}]


def test_a_half_written_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    ws, path = _file(tmp_path)
    whole = _line({"type": "progress", "done": 1, "total": 9})
    _append(path, whole + '{"type": "progress", "do')
    tail = EventTail(ws, JOB)
    assert tail.read() == [json.loads(whole)] and tail.offset == len(whole)
    assert tail.read() == []  # still not finished
    _append(path, 'ne": 2, "total": 9}\n')
    assert tail.read() == [{"type": "progress", "done": 2, "total": 9}]


def test_unreadable_lines_become_log_events(tmp_path: Path) -> None:
    ws, path = _file(tmp_path)
    path.write_bytes(b'not json\n[1, 2]\n\xff\xfe\n\n{"type": "log", "message": "ok"}\n')
    events = EventTail(ws, JOB).read()
    assert [e["type"] for e in events] == ["log"] * 4  # the blank line is skipped
    assert events[0]["message"] == "(unreadable event line skipped: b'not json')"
    assert events[1]["message"] == "[1, 2]"  # JSON, but not an object
    assert events[2]["message"].startswith("(unreadable event line skipped")
    assert events[3] == {"type": "log", "message": "ok"}


def test_last_events_reads_the_whole_of_a_small_file(tmp_path: Path) -> None:
    ws, path = _file(tmp_path)
    events = [{"type": "progress", "done": i, "total": 3} for i in range(3)]
    _append(path, "".join(_line(e) for e in events))
    assert last_events(ws, JOB) == events


def test_last_events_leaves_a_half_written_line_for_later(tmp_path: Path) -> None:
    ws, path = _file(tmp_path)
    whole = {"type": "log", "message": "whole"}
    _append(path, _line(whole) + '{"type": "progress", "do')
    assert last_events(ws, JOB) == [whole]


def test_last_events_of_a_larger_file_drops_the_line_it_cut(tmp_path: Path) -> None:
    ws, path = _file(tmp_path)
    lines = [_line({"type": "progress", "done": i, "total": 99}) for i in range(10)]
    _append(path, "".join(lines))
    max_bytes = len(lines[-1]) * 3 + 5  # the last three lines and the end of the one before
    events = last_events(ws, JOB, max_bytes=max_bytes)
    assert [e["done"] for e in events] == [7, 8, 9]
    assert all(e["type"] == "progress" for e in events)  # the cut line is not an unreadable one
