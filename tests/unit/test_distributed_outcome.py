"""How a data-parallel job's end is judged from its ranks' outcome files and torchrun's status:
a rank that reported failure wins; rank 0's success stands even when a worker crashes in torch's
teardown afterwards (seen on CI: SIGABRT in a gloo destructor after the last step); nothing
reported is a failure that points at the workers' log."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from appliance.errors import ApplianceError
from appliance.jobs import JobCancelled
from appliance.stages.train.distributed import _outcome


def _ctx(tmp_path: Path, **outcomes: dict) -> SimpleNamespace:
    (tmp_path / "work").mkdir(parents=True)
    for rank, outcome in outcomes.items():
        (tmp_path / "work" / f"outcome.{rank.removeprefix('r')}.json").write_text(json.dumps(outcome))
    said: list[str] = []
    return SimpleNamespace(dir=tmp_path, job=SimpleNamespace(id="j1"), log=said.append, said=said)


def test_rank_0_success_stands_after_a_teardown_crash(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, r0={"state": "succeeded", "result": {"run": "r"}})
    assert _outcome(ctx, -6) == {"run": "r"}
    assert "status -6" in ctx.said[0] and "complete" in ctx.said[0]
    ctx.said.clear()
    assert _outcome(ctx, 0) == {"run": "r"} and ctx.said == []


def test_a_failed_rank_wins_over_rank_0(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, r0={"state": "succeeded", "result": {}},
               r1={"state": "failed", "title": "Out of memory", "message": "rank 1: OOM"})
    with pytest.raises(ApplianceError, match="rank 1: OOM"):
        _outcome(ctx, 1)


def test_cancelled_and_silent_ends(tmp_path: Path) -> None:
    with pytest.raises(JobCancelled):
        _outcome(_ctx(tmp_path / "a", r0={"state": "cancelled"}), 0)
    with pytest.raises(ApplianceError, match="without saying why"):
        _outcome(_ctx(tmp_path / "b"), 1)
