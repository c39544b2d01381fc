"""Wide terminals: the Train form keeps its fields a readable width, and the dashboard puts its
jobs beside the system status instead of leaving most of a 200-column screen empty."""

from __future__ import annotations

import pytest
from textual.widgets import Input
from tuikit import app_for, build_fixed_workspace, settle

from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp


@pytest.fixture(scope="module")
def fixed_ws(module_tmp: ModuleTemp) -> Workspace:
    return build_fixed_workspace(module_tmp.mktemp("layout"))


async def test_the_train_form_is_capped_at_200_columns(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.press("4")
        await settle(app, pilot)
        field = app.screen.query_one("#f-max_steps", Input)
        assert field.size.width <= 40
        assert app.screen.query_one("#extras", Input).size.width <= 120


async def test_the_dashboard_uses_the_width(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(200, 50)) as pilot:
        await settle(app, pilot)
        system = app.screen.query_one("#system")
        recent = app.screen.query_one("#recent")
        assert recent.region.x >= 90 and recent.region.y < system.region.bottom + 4
        assert recent.region.right > 150
