"""The help screen: every key of every screen and dialog, read from their BINDINGS.

Generated, not written: a key added to a screen appears here (and in the command palette) without
anyone remembering to document it. The keys every screen shares (refresh, filter, back, the moves
in a list) are said once, under "Everywhere", not again under each screen. It opens at the section
of the screen it was asked from, and `/` filters it like a list (a row stays when its keys, its
description or its section's name hold the text).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Input, Label, Static

from tui import dialogs

SHARED_DIALOGS = (dialogs.ConfirmDialog, dialogs.ErrorDialog, dialogs.FilePicker)
EVERYWHERE = [("1…9 / alt+1…9", "Go to a screen (alt+: also while typing in a text box)"),
              ("ctrl+p", "Command palette: every screen and action, searchable"),
              ("tab / shift+tab", "Next / previous field or table")]
IN_LISTS = [("↑ ↓ / j k", "Previous / next row"), ("g / G", "First / last row")]

KEY_NAMES = {"question_mark": "?", "backspace": "backspace", "delete": "del", "slash": "/",
             "shift+g": "G"}
Rows = list[tuple[str, str]]


def key_label(keys: str) -> str:
    """'ctrl+c,super+c' -> 'ctrl+c'; 'slash' -> '/': keys as the help and the footer write them
    (super+ is macOS's copy, which a terminal on Linux does not send)."""
    names = [KEY_NAMES.get(k, k) for k in keys.split(",") if not k.startswith("super+")]
    return " / ".join(dict.fromkeys(names)) or keys


def key_rows(cls: type[Any], leave_out: Rows | None = None) -> Rows:
    """(keys, description) per action of a class's merged BINDINGS, keys joined with ' / ';
    without the rows in `leave_out` (those said elsewhere) and the app's screen keys."""
    by_action: dict[tuple[str, str], list[str]] = {}
    for key, bindings in cls._merge_bindings().key_to_bindings.items():
        for b in bindings:
            if b.description and not b.system and not b.action.startswith(("app.focus", "app.goto")):
                name = KEY_NAMES.get(key, key)
                keys = by_action.setdefault((b.action, b.description), [])
                if name not in keys:
                    keys.append(name)
    rows = [(" / ".join(keys), description) for (_, description), keys in by_action.items()]
    return [row for row in rows if row not in (leave_out or [])]


def shared_rows() -> Rows:
    """What every screen (and every dialog) has: said once."""
    from tui.screens.base import ApplianceScreen

    return key_rows(ApplianceScreen)


def sections(app_class: type[Any]) -> Iterator[tuple[str, str, Rows]]:
    """(id, heading, rows) for the app (`app_class`: its own keys), each screen and each dialog."""
    from tui.registry import SCREENS

    shared = shared_rows()
    generic = key_rows(Screen) + key_rows(ModalScreen)
    yield "everywhere", "Everywhere", [*EVERYWHERE, *key_rows(app_class), *shared, *IN_LISTS]
    dialog_classes: list[type[Any]] = list(SHARED_DIALOGS)
    for entry in SCREENS:
        cls = entry.load()
        yield entry.mode, f"{entry.key} {entry.title}", key_rows(cls, shared + generic)
        module = importlib.import_module(entry.module)
        dialog_classes += [d for d in getattr(module, "DIALOGS", ()) if d not in dialog_classes]
    for cls in dialog_classes:
        yield (f"dialog-{cls.__name__}", f"Dialog: {getattr(cls, 'HELP_TITLE', cls.__name__)}",
               key_rows(cls, generic))


def section_text(heading: str, rows: Rows) -> Text:
    text = Text(heading, style="bold")
    width = max((len(k) for k, _ in rows), default=0)
    for keys, description in rows:
        text.append(f"\n  {keys:<{width}}  ", style="bold cyan")
        text.append(description)
    return text


def matching(heading: str, rows: Rows, wanted: str) -> Rows:
    """The rows a filter keeps: all of them when the heading matches, else those that match."""
    wanted = wanted.strip().casefold()
    if not wanted or wanted in heading.casefold():
        return rows
    return [(k, d) for k, d in rows if wanted in k.casefold() or wanted in d.casefold()]


def render_sections(app_class: type[Any]) -> Text:
    text = Text()
    for _, heading, rows in sections(app_class):
        text.append_text(section_text(heading, rows))
        text.append("\n\n")
    return text


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90; max-width: 100%; height: 100%; border: thick $primary; background: $surface;
        padding: 0 1;
    }
    HelpScreen .section { margin-bottom: 1; }
    HelpScreen #help-title { dock: top; background: $surface; }
    HelpScreen #help-filter-bar { display: none; height: 1; dock: bottom; background: $panel; }
    HelpScreen #help-filter-bar Label { width: auto; text-style: bold; padding: 0 1; }
    HelpScreen #help-filter { width: 1fr; border: none; height: 1; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Close (first the filter, if one is open)"),
        Binding("question_mark,q", "close", "Close"),
        Binding("slash", "filter", "Filter the keys", key_display="/"),
        Binding("j", "scroll('down')", "Scroll down", show=False),
        Binding("k", "scroll('up')", "Scroll up", show=False),
        Binding("g", "scroll('home')", "Top", show=False),
        Binding("G,shift+g", "scroll('end')", "Bottom", show=False),
    ]

    def __init__(self, current: str | None = None, *, app_class: type[Any]) -> None:
        super().__init__()
        self.current = current  # the mode whose section is shown first
        self.all = list(sections(app_class))

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Label("Keys (escape closes; / filters; arrows, j / k, page keys scroll)",
                        classes="heading", id="help-title")
            yield Static("Quitting never stops a job: jobs are separate processes (5 Jobs, or "
                         "`appliance jobs list`, finds them again).", classes="muted")
            for section_id, heading, rows in self.all:
                yield Static(section_text(heading, rows), id=f"help-{section_id}",
                             classes="section")
            with Horizontal(id="help-filter-bar"):
                yield Label("/")
                yield Input(placeholder="filter the keys; esc clears", compact=True,
                            id="help-filter")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
        if self.current:
            self.call_after_refresh(self._show_current)

    def _show_current(self) -> None:
        target = self.query(f"#help-{self.current}")
        if target:
            self.query_one(VerticalScroll).scroll_to_widget(target.first(), top=True, animate=False)

    def action_scroll(self, where: str) -> None:
        box = self.query_one(VerticalScroll)
        {"down": box.scroll_down, "up": box.scroll_up, "home": box.scroll_home,
         "end": box.scroll_end}[where](animate=False)

    def action_filter(self) -> None:
        self.query_one("#help-filter-bar").display = True
        self.query_one("#help-filter", Input).focus()

    @on(Input.Changed, "#help-filter")
    def _filtered(self, event: Input.Changed) -> None:
        for section_id, heading, rows in self.all:
            kept = matching(heading, rows, event.value)
            section = self.query_one(f"#help-{section_id}", Static)
            section.display = bool(kept)
            section.update(section_text(heading, kept))
        self.query_one(VerticalScroll).scroll_home(animate=False)

    @on(Input.Submitted, "#help-filter")
    def _kept(self) -> None:
        self.query_one(VerticalScroll).focus()

    def action_back(self) -> None:
        box = self.query_one("#help-filter", Input)
        if self.query_one("#help-filter-bar").display:
            box.value = ""
            self.query_one("#help-filter-bar").display = False
            self.query_one(VerticalScroll).focus()
        else:
            self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
