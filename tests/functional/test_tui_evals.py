"""The Eval screen on a workspace holding an eval artifact written as the eval stage writes it
(tuikit.add_eval: the stage's own metrics and report functions on fixed answers): targets side by
side with their deltas, items sorted by delta, one item's prompt, reference and two answers, the
delta chart, a new evaluation submitted through the door, and the empty state."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from textual.widgets import Button, Input, Select, SelectionList, Static
from tuikit import (
    EVAL,
    EVAL_ITEMS,
    EVAL_TARGETS,
    MODEL,
    RUN,
    app_for,
    build_fixed_workspace,
    check_snapshot,
    settle,
)

from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp
from tests.unit.test_layers import loaded_after_import
from tui.screens import evals
from tui.screens.evals import EvalDialog, EvalsScreen, ItemView, chart_bar, delta_chart
from tui.widgets import KeyedTable


@pytest.fixture(scope="module")
def fixed_ws(module_tmp: ModuleTemp) -> Workspace:
    return build_fixed_workspace(module_tmp.mktemp("evals"))


def _report(ws: Workspace) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ws.artifact_dir("eval", EVAL) / "eval.json").read_text())
    return doc


def _keys(table: KeyedTable) -> list[str]:
    return [str(table.coordinate_to_cell_key((i, 0)).row_key.value)  # type: ignore[arg-type]
            for i in range(table.row_count)]


def _text(screen: Any, selector: str) -> str:
    """A Static's content as plain text (a Rich renderable rendered 200 columns wide)."""
    content = screen.query_one(selector, Static).content
    if isinstance(content, str):
        return content
    console = Console(width=200, file=io.StringIO(), record=True, color_system=None)
    console.print(content)
    return console.export_text()


def _chrf_deltas(doc: dict[str, Any], target: int) -> list[float]:
    rows = doc["targets"]
    return [t["scores"]["chrf"] - b["scores"]["chrf"]
            for b, t in zip(rows[0]["items"], rows[target]["items"], strict=True)]


async def test_targets_side_by_side_with_their_deltas(fixed_ws: Workspace) -> None:
    doc = _report(fixed_ws)
    app = app_for(fixed_ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("9")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, EvalsScreen) and screen.view is not None
        assert _keys(screen.query_one("#evals", KeyedTable)) == [EVAL]
        report = _text(screen, "#report")
        for target in doc["targets"]:  # the base in the heading, the others in the chart
            assert target["name"] in report
        assert "transformers" in report and "llama.cpp" in report
        run = doc["targets"][1]
        assert f"{run['totals']['chrf']:.1f} ({run['deltas']['chrf']:+.1f})" in report
        assert f"{run['deltas']['rougeL'] * 100:+.1f}" in report  # ROUGE shown in %
        judged = run["judge"]  # the judge's counts, as the CLI writes them (EVAL_JUDGE)
        assert (judged["wins"], judged["losses"], judged["inconsistent"]) == (2, 2, 1)
        assert f"{RUN} vs {MODEL}: 2 won, 2 lost, 0 tied, 1 inconsistent" in " ".join(report.split())
        items = screen.query_one("#items", KeyedTable)
        assert _keys(items) == [str(i) for i in range(len(EVAL_ITEMS))]
        assert [str(c.label) for c in items.columns.values()] == ["#", "prompt", "base", "T1", "T2", "Δ"]
        assert f"T1 {RUN}" in _text(screen, "#items-head")


async def test_s_sorts_items_by_delta_t_picks_the_target_m_the_metric(fixed_ws: Workspace) -> None:
    doc = _report(fixed_ws)
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("9")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, EvalsScreen)
        items = screen.query_one("#items", KeyedTable)
        deltas = _chrf_deltas(doc, 1)
        worst = sorted(range(len(deltas)), key=lambda i: deltas[i])
        await pilot.press("s")
        await settle(app, pilot)
        assert screen.order == "worst" and _keys(items) == [str(i) for i in worst]
        assert deltas[worst[0]] < 0  # the run's regression (item 3) comes first
        assert "worst first" in _text(screen, "#items-head")
        await pilot.press("s")
        await settle(app, pilot)
        assert _keys(items) == [str(i) for i in sorted(range(len(deltas)), key=lambda i: -deltas[i])]
        await pilot.press("s")
        await settle(app, pilot)
        assert _keys(items) == [str(i) for i in range(len(deltas))]
        await pilot.press("s", "t")  # worst first, against the GGUF now
        await settle(app, pilot)
        gguf = _chrf_deltas(doc, 2)
        assert screen.target == 2 and "Δ = T2 − base" in _text(screen, "#items-head")
        assert _keys(items)[0] == str(min(range(len(gguf)), key=lambda i: gguf[i]))
        await pilot.press("m")
        await settle(app, pilot)
        assert screen.metric == "rougeL" and "ROUGE-L per item" in _text(screen, "#items-head")


async def test_an_item_shows_its_prompt_reference_and_both_answers(fixed_ws: Workspace) -> None:
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("9")
        await settle(app, pilot)
        await pilot.press("enter")  # from the evals list to its items
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, EvalsScreen) and screen.focused is screen.query_one("#items")
        await pilot.press("s", "enter")  # the worst item first, opened
        await settle(app, pilot)
        view = app.screen
        assert isinstance(view, ItemView)
        prompt, reference, base, run, _ = EVAL_ITEMS[3]
        assert prompt in _text(view, "#prompt") and "Answer in one short sentence." in _text(view, "#prompt")
        assert reference in _text(view, "#reference")
        assert MODEL in _text(view, "#answer-base") and base in _text(view, "#answer-base")
        assert RUN in _text(view, "#answer-target") and run in _text(view, "#answer-target")
        # the judge preferred the base's answer in both orders (EVAL_JUDGE[0][3])
        assert "judge: worse than the base" in _text(view, "#answer-target")
        assert "judge:" not in _text(view, "#answer-base")
        await pilot.press("n")
        await settle(app, pilot)
        assert view.item == view.order[1] and EVAL_ITEMS[view.item][1] in _text(view, "#reference")
        await pilot.press("escape")
        await settle(app, pilot)
        assert isinstance(app.screen, EvalsScreen)


def test_the_chart_shows_the_sign_beside_each_bar(fixed_ws: Workspace) -> None:
    assert chart_bar(-30.0, 60.0, 4).plain == "  ▇▇│    "
    assert chart_bar(60.0, 60.0, 4).plain == "    │▇▇▇▇"
    assert chart_bar(0.01, 60.0, 4).plain == "    │    "
    view = evals.read_eval(fixed_ws.artifact_dir("eval", EVAL))
    chart = delta_chart(view).plain
    run = view.targets[1]["deltas"]
    assert f"{run['chrf']:+6.1f}" in chart and RUN in chart
    assert all(f"{view.targets[2]['deltas'][m] * evals.scale(m):+6.1f}" in chart
               for m in evals.CHART_METRICS)


async def test_n_starts_an_eval_through_the_door(fixed_ws: Workspace, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    started: list[Any] = []

    class Job:
        id, kind, state = "20261122-120000-eval-abcdef", "eval", "queued"

    def start_request(ws: Workspace, request: Any) -> Job:
        started.append(request)
        return Job()

    monkeypatch.setattr(evals.api, "start_request", start_request)
    app = app_for(fixed_ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("9")
        await settle(app, pilot)
        await pilot.press("n")
        await settle(app, pilot)
        dialog = app.screen
        assert isinstance(dialog, EvalDialog)
        targets = dialog.query_one("#targets", SelectionList)
        targets.select(f"{RUN}-gguf-q8_0")
        targets.select(MODEL)  # ticked second: compared with the first
        dialog.query_one("#limit", Input).value = "four"
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        assert app.screen is dialog and "limit: a whole number" in " ".join(
            str(s.render()) for s in dialog.query(".problem"))
        targets.deselect_all()  # the longest problem line: the buttons stay on the 80x24 screen
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        for button in dialog.query(Button):
            assert button.region.bottom <= 24 and button.region.height > 0, button.label
        targets.select(f"{RUN}-gguf-q8_0")
        targets.select(MODEL)
        dialog.query_one("#limit", Input).value = "4"
        dialog.query_one("#max_new_tokens", Input).value = "32"
        judges = dialog.query_one("#judge", Select)
        assert [v for _, v in judges._options] == ["", f"{RUN}-gguf-q8_0"]  # GGUF exports only
        judges.value = f"{RUN}-gguf-q8_0"
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        assert isinstance(app.screen, EvalsScreen)
    assert [r.to_params() for r in started] == [
        {"targets": [f"{RUN}-gguf-q8_0", MODEL], "data": "", "limit": 4, "max_new_tokens": 32,
         "seed": 0, "name": None, "judge": f"{RUN}-gguf-q8_0", "rubric": ""}]


async def test_without_an_eval_the_screen_says_how_to_make_one(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "ws").ensure())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("9")
        await settle(app, pilot)
        shown = _text(app.screen, "#report")
        assert "No evaluations yet" in shown and "appliance eval BASE TARGET" in shown
        assert app.screen.query_one("#items", KeyedTable).row_count == 0
        check_snapshot(app, "evals-empty-80x24", tmp_path)


def test_the_screen_loads_nothing_heavy() -> None:
    loaded = loaded_after_import(["tui.screens.evals"])  # top-level package names
    heavy = {"torch", "transformers", "numpy", "sacrebleu", "llama_cpp", "onnxruntime"}
    assert "appliance" in loaded and not loaded & heavy


def test_the_fixture_names_its_targets_as_the_report_does(fixed_ws: Workspace) -> None:
    assert [t["name"] for t in _report(fixed_ws)["targets"]] == [t[0] for t in EVAL_TARGETS]
