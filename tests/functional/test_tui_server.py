"""The Server screen: on a real GGUF export, create a key, start the server from the UI, answer a
real request with that key and see it counted, stop the server, revoke the key. Snapshots of a
serving state come from a fixed workspace with a serve job row and fixed metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.widgets import Input, Select, SelectionList, Static
from tuikit import (
    app_for,
    build_fixed_workspace,
    check_snapshot,
    gguf_export,
    screen_text,
    settle,
    wait_for,
)

from appliance import jobs
from appliance.runtime import keys, service
from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp
from tui.screens.server import KeyShown, ServerScreen, StartDialog
from tui.widgets import KeyedTable


def _rows(screen: ServerScreen, table: str) -> list[list[str]]:
    t = screen.query_one(f"#{table}", KeyedTable)
    return [[str(c) for c in t.get_row_at(i)] for i in range(t.row_count)]


def _chat(url: str, key: str, model: str) -> int:
    body = json.dumps({"model": model, "max_tokens": 6, "temperature": 0,
                       "messages": [{"role": "user", "content": "Hello"}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def ws(tmp_path: Path, stop_jobs_after: Callable[[Workspace], Workspace]) -> Workspace:
    """A workspace with a servable export; any server still running at the end is stopped."""
    ws = stop_jobs_after(Workspace(tmp_path / "ws").ensure())
    gguf_export(ws, "smol-a")
    return ws


@pytest.mark.integration
async def test_keys_start_request_stop(ws: Workspace) -> None:
    app = app_for(ws, poll_s=0.3)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("8")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, ServerScreen)
        assert "No server running" in str(screen.query_one("#status", Static).render())

        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, type(app.screen)) and
                       bool(app.screen.query("#name")))
        app.screen.query_one("#name", Input).value = "helpdesk"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, KeyShown))
        key = str(app.screen.query_one("#key", Static).render())
        assert keys.KeyChecker(ws).name_of(key) == "helpdesk"
        await pilot.press("enter")
        await wait_for(pilot, lambda: _rows(screen, "keys") and _rows(screen, "keys")[0][3] == "active")

        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, StartDialog))
        dialog = app.screen
        assert list(dialog.query_one("#exports", SelectionList).selected) == ["smol-a"]
        dialog.query_one("#port", Input).value = "0"
        assert dialog.query_one("#device", Select).value == "auto"  # serve's default: the GPU if it fits
        dialog.query_one("#device", Select).value = "cpu"  # --cpu
        await pilot.click("#go")
        await wait_for(pilot, lambda: _rows(screen, "servers") and
                       _rows(screen, "servers")[0][1] == "serving", timeout=90)
        url = "http://" + _rows(screen, "servers")[0][0]
        (job_id,) = [s.job.id for s in screen.last.servers if s.job]
        assert jobs.get(ws, job_id).state == "running"
        assert jobs.get(ws, job_id).params["device"] == "cpu"

        assert await asyncio.to_thread(_chat, url, key, "smol-a") == 200
        assert await asyncio.to_thread(_chat, url, "apk_00000000_" + "x" * 40, "smol-a") == 401
        await wait_for(pilot, lambda: _rows(screen, "metrics") and
                       _rows(screen, "metrics")[0][1] == "1")
        name, _, errors, run_wait, tokens = _rows(screen, "metrics")[0][:5]
        assert (name, errors, run_wait) == ("smol-a (cpu)", "0", "0/0") and tokens.split("/")[1] != "0"

        screen.query_one("#servers", KeyedTable).focus()
        await pilot.press("t")
        await settle(app, pilot)
        await pilot.press("y")
        await wait_for(pilot, lambda: jobs.get(ws, job_id).state == "cancelled", timeout=30)
        await wait_for(pilot, lambda: not _rows(screen, "servers"))
        assert service.health(url, timeout=0.5) is None
        await settle(app, pilot)  # no blank row left where the stopped server was
        lines = screen_text(app).splitlines()
        header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["address", "state"])
        assert lines[header + 1].lstrip().startswith("Requests"), lines[header:header + 3]

        screen.query_one("#keys", KeyedTable).focus()
        await pilot.press("x")
        await settle(app, pilot)
        await pilot.press("y")
        await wait_for(pilot, lambda: _rows(screen, "keys")[0][3].startswith("revoked"))
        assert keys.KeyChecker(ws).name_of(key) is None


@pytest.mark.integration
async def test_a_server_that_fails_to_start_says_why(ws: Workspace) -> None:
    gguf_export(ws, "smol-bad")
    model = next(ws.get("export", "smol-bad").path.glob("*.gguf"))
    with open(model, "r+b") as fh:  # same size: the quick check passes, serve's sha256 check does not
        fh.write(b"\0" * 64)
    app = app_for(ws, poll_s=0.3)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("8")
        await settle(app, pilot)
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, StartDialog))
        choices = app.screen.query_one("#exports", SelectionList)
        choices.deselect_all()
        choices.select("smol-bad")
        app.screen.query_one("#port", Input).value = "0"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: any(n.title == "Job did not succeed" for n in app._notifications),
                       timeout=60)
        (note,) = [n for n in app._notifications if n.title == "Job did not succeed"]
        assert "failed" in note.message and "Integrity check failed" in note.message
        assert model.name in note.message
        assert not _rows(app.screen, "servers")


async def test_start_needs_an_export(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "ws").ensure())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("8", "s")
        await settle(app, pilot)
        assert isinstance(app.screen, ServerScreen)
        assert any("Nothing to serve" in (n.title or "") for n in app._notifications)


# -- snapshots --------------------------------------------------------------------------------------
SERVE_JOB = "20261122-120000-serve-5e5e5e"


def _fixed_metrics(url: str) -> service.MetricsSnapshot:
    assert url == "http://127.0.0.1:8321"
    return service.MetricsSnapshot(models={"support-run-gguf-q8_0": service.ModelStats(
        requests=128, errors=3, prompt_tokens=10342, completion_tokens=20511, running=1, queued=2,
        latency_sum=301.5, latency_count=125, ttft_sum=12.5, ttft_count=125)}, requests=140)


@pytest.fixture(scope="module")
def serving_ws(module_tmp: ModuleTemp) -> Workspace:
    ws = build_fixed_workspace(module_tmp.mktemp("serving"))
    options = service.ServeOptions(("support-run-gguf-q8_0",))
    with ws.connect() as db:  # a running job without a pid: shown as running, never judged dead
        db.execute("INSERT INTO jobs (id, kind, params, state, created, attempt) VALUES "
                   "(?, 'serve', ?, 'running', '2026-11-22T12:00:00+00:00', 1)",
                   (SERVE_JOB, json.dumps(options.params())))
        db.executescript(keys.SCHEMA)
        db.executemany("INSERT INTO api_keys (id, name, sha256, created, revoked) VALUES (?,?,?,?,?)",
                       [("0a1b2c3d", "helpdesk-bot", "0" * 64, "2026-11-20T09:00:00Z", None),
                        ("4e5f6a7b", "old-script", "1" * 64, "2026-11-01T08:00:00Z",
                         "2026-11-21T17:30:00Z")])
    folder = jobs.job_dir(ws, SERVE_JOB)
    folder.mkdir(parents=True)
    events = [{"type": "state", "state": "running"},
              {"type": "log", "message": "loading support-run-gguf-q8_0 (gguf, parity pass) ..."},
              {"type": "listening", "url": "http://127.0.0.1:8321", "port": 8321}]
    (folder / "events.jsonl").write_text("".join(json.dumps({"ts": 1795000000.0, **e}) + "\n"
                                                 for e in events))
    return ws


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
async def test_snapshot_serving(serving_ws: Workspace, size: tuple[int, int], tmp_path: Path) -> None:
    app = app_for(serving_ws, server_metrics=_fixed_metrics)
    async with app.run_test(size=size) as pilot:
        await pilot.press("8")
        await settle(app, pilot)
        check_snapshot(app, f"server-serving-{size[0]}x{size[1]}", tmp_path)


async def test_snapshot_start_dialog(serving_ws: Workspace, tmp_path: Path) -> None:
    app = app_for(serving_ws, server_metrics=_fixed_metrics)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("8")
        await settle(app, pilot)
        await pilot.press("s")
        await settle(app, pilot)
        for field in app.screen.query(Input):
            field.cursor_blink = False
        await pilot.pause()
        check_snapshot(app, "server-start-80x24", tmp_path)


def test_tok_s_is_the_generation_speed_measured_by_the_server_not_a_poll_difference() -> None:
    """Completion tokens are counted when an answer ends, so a rate between two polls read 0.0
    while answers streamed. The server's own timings give tokens per second of generation."""
    from tui.screens.server import Served, ServerRead, metric_rows, requests_note

    fast = service.ModelStats(requests=125, completion_tokens=20511, latency_sum=301.5,
                              latency_count=125, ttft_sum=12.5, ttft_count=125)
    slow = service.ModelStats(requests=2, completion_tokens=17, latency_sum=6.0, latency_count=2,
                              ttft_sum=1.0, ttft_count=2)
    idle = service.ModelStats()
    snapshot = service.MetricsSnapshot(models={"fast": fast, "slow": slow, "idle": idle},
                                       requests=140, unauthorized=12)
    read = ServerRead([Served("j", "http://127.0.0.1:8321", "serving", ["fast"], metrics=snapshot)])
    for _ in range(2):  # the same figures on every poll, whatever happened between them
        rates = {row[1][0]: row[1][5] for row in metric_rows(read)}
        assert rates == {"fast": "71", "slow": "3.4", "idle": "-"}
    assert "12" in requests_note(read) and "401" in requests_note(read)
