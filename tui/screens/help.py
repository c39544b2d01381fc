"""The help screen: every key of every screen and dialog, read from their BINDINGS.

Generated, not written: a key added to a screen appears here (and in the command palette) without
anyone remembering to document it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui import dialogs

SHARED_DIALOGS = (dialogs.ConfirmDialog, dialogs.ErrorDialog, dialogs.FilePicker)
EVERYWHERE = [("ctrl+p", "Command palette: every screen and action, searchable"),
              ("tab / shift+tab", "Next / previous field or table"),
              ("escape", "Leave a text field (then the number keys switch screens again)")]


KEY_NAMES = {"question_mark": "?", "backspace": "backspace", "delete": "del"}


def key_rows(cls: type[Any]) -> list[tuple[str, str]]:
    """(keys, description) per action of a class's merged BINDINGS, keys joined with ' / '."""
    by_action: dict[tuple[str, str], list[str]] = {}
    for key, bindings in cls._merge_bindings().key_to_bindings.items():
        for b in bindings:
            if b.description and not b.system and not b.action.startswith("app.focus"):
                by_action.setdefault((b.action, b.description), []).append(KEY_NAMES.get(key, key))
    return [(" / ".join(keys), description) for (_, description), keys in by_action.items()]


def sections() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(heading, rows) for the app, each screen and each dialog."""
    from tui.app import SCREENS, ApplianceApp

    yield "Everywhere", [*key_rows(ApplianceApp), *EVERYWHERE]
    dialog_classes: list[type[Any]] = list(SHARED_DIALOGS)
    for entry in SCREENS:
        cls = entry.load()
        yield f"{entry.key} {entry.title}", key_rows(cls)
        module = importlib.import_module(entry.module)
        dialog_classes += [d for d in getattr(module, "DIALOGS", ()) if d not in dialog_classes]
    for cls in dialog_classes:
        yield f"Dialog: {getattr(cls, 'HELP_TITLE', cls.__name__)}", key_rows(cls)


def render_sections() -> Text:
    text = Text()
    for heading, rows in sections():
        text.append(f"{heading}\n", style="bold")
        width = max((len(k) for k, _ in rows), default=0)
        for keys, description in rows:
            text.append(f"  {keys:<{width}}  ", style="bold cyan")
            text.append(f"{description}\n")
        text.append("\n")
    return text


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90; max-width: 100%; height: 100%; border: thick $primary; background: $surface;
        padding: 0 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label("Keys (escape closes; arrows / page keys scroll)", classes="heading")
            yield Static("Quitting never stops a job: jobs are separate processes (5 Jobs, or "
                         "`appliance jobs list`, finds them again).", classes="muted")
            yield Static(render_sections(), id="keys")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()

    def action_close(self) -> None:
        self.dismiss(None)
