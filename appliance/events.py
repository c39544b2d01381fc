"""Reading a job's event file while the job is still writing it.

A job appends one JSON object per line to `jobs/<id>/events.jsonl` (`appliance.jobs.append_event`),
and readers poll it: the TUI's live views, a dashboard summary line. Two promises make that safe
without locks. A reader takes complete lines only, so a line half-written when it looks waits for the
next read; and a line that is not a JSON object never stops a reader, it becomes a `log` event that
says it was skipped. Torch-free and UI-free, so any front end can follow a job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.workspace import Workspace, job_dir

Event = dict[str, Any]
TAIL_BYTES = 16384  # what `last_events` reads by default: enough for a summary line


def _parse(line: bytes) -> Event:
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"type": "log", "message": f"(unreadable event line skipped: {line[:60]!r})"}
    return event if isinstance(event, dict) else {"type": "log", "message": str(event)}


def events_path(ws: Workspace, job_id: str) -> Path:
    return job_dir(ws, job_id) / "events.jsonl"


class EventTail:
    """Reads a job's events from a byte offset, complete lines only (a line being written waits)."""

    def __init__(self, ws: Workspace, job_id: str) -> None:
        self.job_id = job_id
        self.path: Path = events_path(ws, job_id)
        self.offset = 0

    def read_from(self, offset: int) -> tuple[list[Event], int]:
        """The complete events after byte `offset`, and the offset after them (pure: a read
        whose result is dropped loses nothing)."""
        if not self.path.exists():
            return [], offset
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        return [_parse(line) for line in data[:end].splitlines() if line.strip()], offset + end

    def read(self) -> list[Event]:
        events, self.offset = self.read_from(self.offset)
        return events


def last_events(ws: Workspace, job_id: str, max_bytes: int = TAIL_BYTES) -> list[Event]:
    """The events in the last `max_bytes` of a job's file (what a summary line needs)."""
    path = events_path(ws, job_id)
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - max_bytes))
        data = fh.read()
    lines = data[:data.rfind(b"\n") + 1].splitlines()  # a line being written waits
    if size > max_bytes:
        lines = lines[1:]  # the first one is probably cut
    return [_parse(line) for line in lines if line.strip()]
