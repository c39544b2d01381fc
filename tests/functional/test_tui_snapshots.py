"""SVG snapshots of every screen in its main states, at 80x24 (the floor: nothing may be cut off)
and 120x40 (and 200x50 where a screen changes its layout when wide), on a workspace of fixed
content with a fixed system probe (tuikit.py).

Regenerate after an intended change with `UPDATE_SNAPSHOTS=1 pytest tests/functional/test_tui_snapshots.py`,
look at the SVGs (a browser opens them; the .txt beside each is the same screen as text), commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, Select
from tuikit import (
    TRAIN_JOB,
    app_for,
    build_fixed_workspace,
    check_snapshot,
    no_gpu_probe,
    settle,
)

from appliance.errors import ApplianceError
from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp
from tui.app import ApplianceApp

Steps = Callable[[ApplianceApp, Pilot[Any]], Awaitable[None]]
SMALL, LARGE, WIDE = (80, 24), (120, 40), (200, 50)


def keys(*pressed: str) -> Steps:
    async def steps(app: ApplianceApp, pilot: Pilot[Any]) -> None:
        for key in pressed:
            await pilot.press(key)
            await settle(app, pilot)
    return steps


async def _export_plan(app: ApplianceApp, pilot: Pilot[Any]) -> None:
    await keys("6", "e")(app, pilot)
    app.screen.query_one("#format", Select).value = "plan"
    await settle(app, pilot)


async def _jobs_on_the_training_job(app: ApplianceApp, pilot: Pilot[Any]) -> None:
    app.open_job(TRAIN_JOB)
    await settle(app, pilot)


async def _invalid_form(app: ApplianceApp, pilot: Pilot[Any]) -> None:
    await keys("4")(app, pilot)
    for field, value in (("#f-max_steps", "ten"), ("#f-learning_rate", "5"), ("#name", "bad name")):
        app.screen.query_one(field, Input).value = value
    await settle(app, pilot)
    app.screen.set_focus(None)


async def _error(app: ApplianceApp, pilot: Pilot[Any]) -> None:
    app.show_error(ApplianceError("job 20261122-110000-export-0a1b2c is failed; only queued or "
                                  "running jobs can be cancelled", title="Nothing to cancel",
                                  hint="`appliance jobs resume ID` continues a failed job"),
                   modal=True)
    await settle(app, pilot)


CASES: list[tuple[str, Steps, tuple[tuple[int, int], ...]]] = [
    ("dashboard", keys(), (SMALL, LARGE, WIDE)),
    ("models", keys("2"), (SMALL, LARGE)),
    ("models-delete", keys("2", "x"), (SMALL,)),
    ("models-import", keys("2", "i"), (SMALL,)),
    ("datasets", keys("3"), (SMALL, LARGE)),
    ("datasets-preview", keys("3", "p"), (SMALL, LARGE)),
    ("train-form", keys("4"), (SMALL, LARGE, WIDE)),
    ("train-invalid", _invalid_form, (SMALL,)),
    ("train-live", keys("4", "ctrl+l"), (SMALL, LARGE)),
    ("jobs", _jobs_on_the_training_job, (SMALL, LARGE)),
    ("exports", keys("6"), (SMALL, LARGE)),
    ("exports-export", keys("6", "e"), (SMALL,)),
    ("exports-plan", _export_plan, (SMALL,)),
    ("chat", keys("7"), (SMALL,)),
    ("server", keys("8"), (SMALL,)),
    ("evals", keys("9"), (SMALL, LARGE)),
    ("evals-worst-first", keys("9", "enter", "s"), (SMALL, LARGE)),
    ("evals-item", keys("9", "enter", "s", "enter"), (SMALL, LARGE)),
    ("evals-new", keys("9", "n"), (SMALL,)),
    ("help", keys("question_mark"), (SMALL, LARGE)),
    ("error", _error, (SMALL,)),
]


@pytest.fixture(scope="module")
def fixed_ws(module_tmp: ModuleTemp) -> Workspace:
    return build_fixed_workspace(module_tmp.mktemp("snapshots"))


def _freeze(app: ApplianceApp) -> None:
    """No blinking cursor: a text field's cursor is drawn, steadily."""
    for field in app.screen.query(Input):
        field.cursor_blink = False


@pytest.mark.parametrize(("name", "steps", "size"),
                         [(n, s, size) for n, s, sizes in CASES for size in sizes],
                         ids=[f"{n}-{w}x{h}" for n, _, sizes in CASES for w, h in sizes])
async def test_snapshot(name: str, steps: Steps, size: tuple[int, int], fixed_ws: Workspace,
                        tmp_path: Path) -> None:
    app = app_for(fixed_ws, browse_from=Path("tests/fixtures"))
    async with app.run_test(size=size) as pilot:
        await settle(app, pilot)
        await steps(app, pilot)
        _freeze(app)
        await pilot.pause()
        check_snapshot(app, f"{name}-{size[0]}x{size[1]}", tmp_path)


async def test_snapshot_of_a_new_box(tmp_path: Path) -> None:
    """No workspace yet, no GPU: the dashboard says where to start."""
    app = app_for(Workspace(tmp_path / "none"), probe=no_gpu_probe)
    async with app.run_test(size=SMALL) as pilot:
        await settle(app, pilot)
        check_snapshot(app, "dashboard-empty-80x24", tmp_path)
