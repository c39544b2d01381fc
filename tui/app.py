"""The operator's cockpit: a Textual app with one screen per stage of the pipeline.

Screens are Textual modes (`1`..`9`, the navigation bar, the command palette), imported only when
first shown, so the first paint costs Textual plus the dashboard. Nothing reads the workspace or
the system before that first frame is on the terminal: reads that would compete with it for the
CPU and the GIL (worker threads) wait for it (`after_first_paint`), the screen showing `reading…`
until their results arrive. A screen lives as long as the app: switching away and back keeps what
it holds (a chat, a filter, a followed job). `alt+1`..`alt+9` switch screens even while a text box
has focus (where the digits type), `escape` goes back to the screen before. Every key of every
screen is listed by the help screen (`?`, `f1`) and offered by the command palette, both generated
from the screens' BINDINGS so they cannot drift from what the keys do.

The theme chosen in the palette is kept in a small JSON file (`prefs_path`, by default
`$XDG_CONFIG_HOME/appliance/tui.json`), so it survives a restart.

The app is built from injected parts (the workspace, the system probe, the poll interval, the label
shown for the workspace) so tests and snapshots run it on small real workspaces with fixed numbers.
Jobs are separate processes (`appliance.jobs`): quitting the UI never stops one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import ModalScreen, Screen
from textual.theme import Theme

from appliance.errors import ApplianceError
from appliance.workspace import Workspace
from tui.registry import SCREENS, ScreenEntry
from tui.settings import Settings


def _lazy(entry: ScreenEntry) -> Callable[[], Screen[Any]]:
    return lambda: entry.load()()


HISTORY = 50  # screens `escape` can go back through


def default_prefs_path() -> Path:
    """Where the operator's UI preferences live: their config directory, not the workspace (two
    operators may share a workspace, each with a theme)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "appliance" / "tui.json"


def load_prefs(path: Path | None) -> dict[str, Any]:
    """The saved preferences; none when there is no file or it is unreadable (never fatal)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_prefs(path: Path, prefs: dict[str, Any]) -> None:
    """Write the preferences whole (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(prefs, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


ALT_DIGITS = tuple(f"\x1b{d}" for d in "0123456789")


def let_alt_digits_through() -> None:
    """Make ESC+digit (what xterm, tmux and Linux consoles send for alt+1..alt+9) arrive as
    `alt+N`. Textual maps these sequences to the characters macOS's Option key types in WezTerm
    (`\x1b8` -> `•`), so alt+8 typed a bullet into the chat prompt and never switched screens;
    the pilot's `press("alt+8")` skips the terminal parser, so no test saw it. The table is
    Textual's private `_ansi_sequences.ANSI_SEQUENCES_KEYS` (tests/functional/test_tui_conventions
    feeds the real parser, so an upgrade that changes it fails there)."""
    from textual import _ansi_sequences

    table: Any = _ansi_sequences.ANSI_SEQUENCES_KEYS
    for sequence in ALT_DIGITS:
        table.pop(sequence, None)


def describe_error(error: BaseException, title: str) -> tuple[str, str, str | None]:
    """(title, message, hint): what an operator sees of a failure."""
    if isinstance(error, ApplianceError):
        return error.title, error.message, error.hint
    if type(error).__name__ == "NetworkBlockedError":
        return "Network blocked", str(error), "the appliance runs offline; nothing may be fetched"
    return (f"{title} ({type(error).__name__})", str(error) or repr(error),
            "unexpected: please report it with the steps that led here")


class ApplianceApp(App[int]):
    TITLE = "appliance"
    SUB_TITLE = "offline LLM adaptation and deployment"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {
        e.mode: _lazy(e) for e in SCREENS}
    DEFAULT_MODE = "dashboard"
    # textual annotates it `ClassVar[...] | None`, which mypy reads as an instance variable
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (110, "-wide")]  # type: ignore[misc]
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(e.key, f"app.goto('{e.mode}')", f"Go to {e.title}", show=False) for e in SCREENS),
        # priority: they reach the app before a focused text box takes them as text
        *(Binding(f"alt+{e.key}", f"app.goto('{e.mode}')", f"Go to {e.title}", show=False,
                  priority=True) for e in SCREENS),
        # f1 is the one shown: `?` types into a text box, so the footer would hide it there
        Binding("question_mark", "app.help", "Help", show=False),
        Binding("f1", "app.help", "Help", priority=True),
        Binding("q", "app.quit", "Quit"),
    ]
    CSS = """
    .heading { text-style: bold; color: $accent; height: 1; }
    .muted { color: $text-muted; }
    DataTable { height: auto; max-height: 12; }
    #activity { display: none; height: auto; max-height: 4; color: $warning; padding: 0 1; }
    .split { height: 1fr; }
    Screen.-narrow .split { layout: vertical; }
    Screen.-wide .split { layout: horizontal; }
    """

    def __init__(self, workspace: Workspace, settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        let_alt_digits_through()
        self.workspace = workspace
        self.settings = settings or Settings()
        self.pending_job: str | None = None  # a job the Jobs screen should select when shown
        self.pending_training: str | None = None  # a train job the Train screen should follow
        self.history: list[str] = []  # the screens visited before this one (`escape` goes back)
        self._going_back = False
        self.prefs = load_prefs(self.settings.prefs_path)
        if self.prefs.get("theme") in self.available_themes:
            self.theme = self.prefs["theme"]
        self.painted = False  # the first frame is on the terminal
        self._after_paint: list[Callable[[], object]] = []

    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, self._theme_changed)

    # -- first paint ---------------------------------------------------------------------------
    def after_first_paint(self, callback: Callable[[], object]) -> None:
        """Run `callback` once the first frame is on the terminal (now, if it already is): the
        reads a screen starts when shown wait for it, so their threads do not delay it."""
        if self.painted:
            callback()
        else:
            self._after_paint.append(callback)

    def on_ready(self) -> None:
        """Textual's Ready: the first layout is done and its frame is being drawn; the waiting
        callbacks run after that refresh (the frame is out by then)."""
        self.painted = True
        waiting, self._after_paint = self._after_paint, []
        for callback in waiting:
            self.screen.call_after_refresh(callback)

    def _theme_changed(self, theme: Theme) -> None:
        path = self.settings.prefs_path
        if path is None or self.prefs.get("theme") == theme.name:
            return
        self.prefs["theme"] = theme.name
        try:
            save_prefs(path, self.prefs)
        except OSError as exc:
            self.notify(f"the theme could not be saved to {path}: {exc}", title="Not saved",
                        severity="warning", markup=False)

    # -- navigation -------------------------------------------------------------------------
    def nav_items(self) -> list[tuple[str, str, str, str]]:
        """(key, mode, title, the bar's short title) per screen."""
        return [(e.key, e.mode, e.title, e.nav_title) for e in SCREENS]

    def workspace_label(self) -> str:
        return self.settings.workspace_label or str(self.workspace.root)

    def open_job(self, job_id: str) -> None:
        """Show one job in the Jobs screen (from the dashboard, after a start, ...)."""
        self.pending_job = job_id
        self._show_mode("jobs")

    def open_training(self, job_id: str) -> None:
        """Show a training job's live view (charts) in the Train screen."""
        self.pending_training = job_id
        self._show_mode("train")

    def _show_mode(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)
        elif reload := getattr(self.screen, "reload", None):
            reload()

    def switch_mode(self, mode: str) -> Any:
        """Switch screens, remembering the one left so `escape` can come back to it."""
        if mode != self.current_mode and self.current_mode in self._modes and not self._going_back:
            self.history = [*self.history, self.current_mode][-HISTORY:]
        return super().switch_mode(mode)

    def action_goto(self, mode: str) -> None:
        """A screen's key: switch to it, unless a dialog waits for an answer (the help, which
        asks nothing, is closed on the way)."""
        from tui.screens.help import HelpScreen

        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss(None)
        elif isinstance(self.screen, ModalScreen):
            return
        self.switch_mode(mode)

    def go_back(self) -> None:
        """Back to the screen shown before this one, if any."""
        while self.history and self.history[-1] == self.current_mode:
            self.history.pop()
        if not self.history:
            return
        self._going_back = True
        try:
            self.switch_mode(self.history.pop())
        finally:
            self._going_back = False

    def action_help(self) -> None:
        from tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.current_mode, app_class=type(self)))

    async def run_screen_action(self, mode: str, action: str) -> None:
        """Go to a screen and run one of its actions (what the command palette's entries do)."""
        await self.switch_mode(mode)
        await self.screen.run_action(action)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        from tui.screens.help import key_label

        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: every key of every screen", "?", self.action_help)
        for entry in SCREENS:
            yield SystemCommand(f"Go to {entry.title}", f"key {entry.key}",
                                lambda e=entry: self.switch_mode(e.mode))
        for entry in SCREENS:
            for binding in screen_bindings(entry.load()):
                yield SystemCommand(f"{entry.title}: {binding.description}",
                                    f"key {key_label(binding.key)} on the {entry.title} screen",
                                    lambda e=entry, b=binding: self.run_screen_action(e.mode, b.action),
                                    discover=False)

    # -- errors ------------------------------------------------------------------------------
    def show_error(self, error: BaseException, *, title: str = "Error", modal: bool = False) -> None:
        """A failure as a modal (after an action the operator asked for) or a notification."""
        from tui.dialogs import ErrorDialog

        heading, message, hint = describe_error(error, title)
        if modal:
            self.push_screen(ErrorDialog(heading, message, hint))
        else:
            self.notify(message + (f"\n→ {hint}" if hint else ""), title=heading, severity="error",
                        timeout=12, markup=False)


def screen_bindings(cls: type[Any]) -> Iterator[Binding]:
    """A screen's own bindings with a description, one per action (keys joined)."""
    seen: dict[str, Binding] = {}
    for key, bindings in cls._merge_bindings().key_to_bindings.items():
        for b in bindings:
            if not b.description or b.action.startswith("app.") or b.system:
                continue
            if b.action in seen:
                seen[b.action] = Binding(f"{seen[b.action].key},{key}", b.action, b.description)
            else:
                seen[b.action] = Binding(key, b.action, b.description)
    yield from seen.values()


def run(workspace: Workspace) -> int:
    return ApplianceApp(workspace, Settings(prefs_path=default_prefs_path())).run() or 0
