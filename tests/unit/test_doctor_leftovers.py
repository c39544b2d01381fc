"""`appliance doctor` and the unfinished writes a killed process leaves behind (real processes:
a writer killed with SIGKILL, and one still alive that must never be touched)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from appliance import doctor
from appliance.workspace import Workspace
from tests.unit.test_workspace import spawn_writer, wait_ready


def _killed_writer(ws: Workspace, name: str, tmp_path: Path) -> None:
    proc = spawn_writer(ws.root, name, tmp_path / "never")
    wait_ready(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_leftovers_are_listed_removed_and_audited_but_a_live_writer_is_left_alone(
        workspace: Workspace, tmp_path: Path) -> None:
    _killed_writer(workspace, "dead", tmp_path)
    go = tmp_path / "go"
    alive = spawn_writer(workspace.root, "alive", go)
    try:
        wait_ready(alive)
        [dead] = list((workspace.root / "models").glob(".staging-dead-*"))
        [live] = list((workspace.root / "models").glob(".staging-alive-*"))

        found = doctor.find_leftovers(workspace)
        assert [(f["path"], f["kind"], f["name"]) for f in found] == [(str(dead), "model", "dead")]
        assert found[0]["size_bytes"] >= 4000 and found[0]["age_s"] >= 0

        lines: list[str] = []
        doctor.print_leftovers(found, lines.append)
        text = "\n".join(lines)
        assert str(dead) in text and "appliance doctor --clean" in text and str(live) not in text

        assert doctor.remove_leftovers(workspace) == [dead]
        assert not dead.exists() and live.is_dir()
        assert doctor.find_leftovers(workspace) == []
        events = [json.loads(line) for line in (workspace.root / "audit.log").read_text().splitlines()]
        assert [(e["event"], e["path"]) for e in events if e["event"] == "leftover-removed"] == [
            ("leftover-removed", str(dead))]
    finally:
        go.touch()
        assert alive.wait(timeout=30) == 0
    assert [r.name for r in workspace.list("model")] == ["alive"]  # its commit was not disturbed


def test_collect_reports_leftovers(workspace: Workspace, tmp_path: Path) -> None:
    _killed_writer(workspace, "dead", tmp_path)
    report = doctor.collect(workspace)
    assert [f["name"] for f in report["leftovers"]] == ["dead"]
    lines: list[str] = []
    doctor.print_report(report, lines.append)
    assert any(".staging-dead-" in line for line in lines)


def test_no_workspace_no_leftovers(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "none")
    assert doctor.find_leftovers(ws) == [] and doctor.remove_leftovers(ws) == []
    assert not ws.root.exists()
