"""A data-parallel job and cancels: the workers start inside the runner's cooperative section (a
cancel then reaches them through the flag, not by stopping torchrun), and rank 0's finished run
stands even when another rank reports the cancel."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance import cancellation, jobs
from appliance.stages.train import distributed
from appliance.workspace import Workspace


def test_the_workers_start_inside_the_cooperative_section(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path / "ws")
    ctx = jobs.JobContext(ws, jobs.submit(ws, "selftest", {}))
    seen: list[bool] = []

    class FakeTorchrun:
        def __init__(self, *_: Any, **__: Any) -> None:
            seen.append(cancellation.interruptible())
            outcome = ctx.dir / "work" / "outcome.0.json"
            outcome.write_text(json.dumps({"state": "succeeded", "result": {"run": "r"}}))

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(distributed, "_check_devices", lambda devices: None)
    monkeypatch.setattr(distributed.subprocess, "Popen", FakeTorchrun)
    with cancellation.armed(ctx.dir / "cancel"):
        assert distributed.launch(ctx, 2) == {"run": "r"}
    assert seen == [False]  # a cancel from the moment torchrun starts is the workers' to handle


def test_rank_0_success_stands_when_another_rank_reports_the_cancel(tmp_path: Path) -> None:
    """Rank 0 published the run; a cancel seen by rank 1 while shutting down changes nothing."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "outcome.0.json").write_text(json.dumps({"state": "succeeded", "result": {"run": "r"}}))
    (work / "outcome.1.json").write_text(json.dumps({"state": "cancelled"}))
    ctx = SimpleNamespace(dir=tmp_path, job=SimpleNamespace(id="j1"), log=lambda _: None)
    assert distributed._outcome(ctx, 0) == {"run": "r"}  # type: ignore[arg-type]
