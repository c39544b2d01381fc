"""The first frame waits for Textual and the dashboard's layout only: the dashboard's reads (the
system probe, the artifact counts, the jobs: worker threads that would compete with the frame for
the CPU and the GIL) are started once Textual says the first frame is out (its Ready event), and
their data then replaces `reading…` as before. What the first frame imports loads neither the ML
stack nor psutil (the probe's, imported in its worker). bench/tui_startup.py measures the time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual import events
from textual.message import Message
from textual.widgets import Static
from tuikit import app_for, fixed_probe, settle, wait_for

from appliance.workspace import Workspace
from tests.unit.test_layers import loaded_after_import
from tui.screens.base import ApplianceScreen
from tui.system import SystemStatus

# what the first frame needs: the app, the dashboard, and what the CLI imports to build them
FIRST_FRAME = ("appliance.offline", "appliance.workspace", "tui.app", "tui.screens.dashboard")
NOT_BEFORE_THE_FIRST_FRAME = {"torch", "transformers", "peft", "bitsandbytes", "optimum",
                              "onnxruntime", "llama_cpp", "numpy", "tokenizers", "safetensors",
                              "gguf", "jinja2", "psutil"}


@pytest.mark.parametrize("poll_s", [0.0, 0.001])  # 0.001: a poll due before the first frame
async def test_the_dashboard_reads_start_after_the_first_frame(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poll_s: float) -> None:
    requested: list[str] = []  # the reads asked for, in order (on the UI thread)
    background = ApplianceScreen.background

    def recording(self: ApplianceScreen, work: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        requested.append(kwargs["group"])
        return background(self, work, *args, **kwargs)

    monkeypatch.setattr(ApplianceScreen, "background", recording)
    probed: list[bool] = []

    def probe(ws: Workspace) -> SystemStatus:
        probed.append(True)
        return fixed_probe(ws)

    app = app_for(Workspace(tmp_path / "ws").ensure(), probe=probe, poll_s=poll_s)
    at_first_frame: list[tuple[list[str], bool, str]] = []

    def hook(message: Message) -> None:
        if isinstance(message, events.Ready):
            system = str(app.screen.query_one("#system", Static).render())
            at_first_frame.append((list(requested), bool(probed), system))

    def shown(widget: str) -> str:
        return str(app.screen.query_one(widget, Static).render())

    async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
        await wait_for(pilot, lambda: "Workspace:" in shown("#counts") and "H100" in shown("#system"),
                       what="the dashboard's data")
        assert at_first_frame == [([], False, "reading…")]
        assert {"counts", "system", "jobs"} <= set(requested) and probed
        assert "reading…" not in shown("#system") and "0 models" in shown("#counts")
        assert app.painted


async def test_a_read_asked_for_after_the_first_frame_starts_at_once(tmp_path: Path) -> None:
    app = app_for(Workspace(tmp_path / "none"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        ran: list[bool] = []
        app.after_first_paint(lambda: ran.append(True))
        assert ran == [True]


def test_the_first_frame_imports_no_heavy_module() -> None:
    loaded = loaded_after_import(list(FIRST_FRAME))
    assert {"textual", "tui", "appliance"} <= loaded
    assert not loaded & NOT_BEFORE_THE_FIRST_FRAME, sorted(loaded & NOT_BEFORE_THE_FIRST_FRAME)
