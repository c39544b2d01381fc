"""Server: reachable from the navigation now; the screen itself is the next slice of the TUI.

It will sit on `appliance/runtime/server.py` (start/stop, address, keys, live metrics); until it is
built, it says so and points at the CLI that does it today.
"""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from tui.screens.base import ApplianceScreen

PLACEHOLDER_CSS = """
.placeholder { padding: 1 2; }
.placeholder .heading { margin-bottom: 1; }
"""


class _Placeholder(ApplianceScreen):
    DEFAULT_CSS = PLACEHOLDER_CSS
    WHAT: ClassVar[str] = ""
    TODAY: ClassVar[str] = ""

    def compose_body(self) -> ComposeResult:
        with Vertical(classes="placeholder"):
            yield Static(f"{self.SUB_TITLE}: in the next release of the TUI", classes="heading")
            yield Static(self.WHAT)
            yield Static(self.TODAY, classes="muted")


class ServerScreen(_Placeholder):
    MODE = "server"
    SUB_TITLE = "Server"
    WHAT = ("Start and stop the local OpenAI-compatible API server, see its address, create and "
            "revoke API keys, and watch live request metrics.")
    TODAY = ("Today: `appliance keys create NAME`, then `appliance serve EXPORT` (an OpenAI-compatible "
             "API on 127.0.0.1:8321); Prometheus metrics at /metrics.")
