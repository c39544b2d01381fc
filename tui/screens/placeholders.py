"""Chat and Server: reachable from the navigation now, built when the runtime lands.

Both sit on `appliance/runtime/` (the chat engines and the OpenAI-compatible server), which is being
written; until it is, these screens say so and point at what works today.
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
            yield Static(f"{self.SUB_TITLE}: arrives with the runtime", classes="heading")
            yield Static(self.WHAT)
            yield Static(self.TODAY, classes="muted")


class ChatScreen(_Placeholder):
    MODE = "chat"
    SUB_TITLE = "Chat"
    WHAT = ("Pick an exported artifact, chat with streaming answers over several turns, stop a "
            "generation, set the system prompt and sampling, and compare two artifacts side by side "
            "on the same prompt.")
    TODAY = "Until then the exports' parity table (6 Exports) tells how faithful each artifact is."


class ServerScreen(_Placeholder):
    MODE = "server"
    SUB_TITLE = "Server"
    WHAT = ("Start and stop the local OpenAI-compatible API server, see its address, create and "
            "revoke API keys, and watch live request metrics.")
    TODAY = "Until then jobs (5 Jobs) and exports (6 Exports) are where the work shows."
