"""The operator's cockpit: a Textual app with one screen per stage of the pipeline.

Screens are Textual modes (`1`..`8`, the navigation bar, the command palette), imported only when
first shown, so the first paint costs Textual plus the dashboard. Every key of every screen is
listed by the help screen (`?`) and offered by the command palette, both generated from the
screens' BINDINGS so they cannot drift from what the keys do.

The app is built from injected parts (the workspace, the system probe, the poll interval, the label
shown for the workspace) so tests and snapshots run it on small real workspaces with fixed numbers.
Jobs are separate processes (`appliance.jobs`): quitting the UI never stops one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from appliance.errors import ApplianceError
from appliance.runtime import DEFAULT_PORT
from appliance.workspace import Workspace
from tui.system import Probe, read_system


@dataclass(frozen=True)
class ScreenEntry:
    mode: str
    key: str
    title: str
    module: str
    cls: str

    def load(self) -> type[Screen[Any]]:
        return getattr(importlib.import_module(self.module), self.cls)


SCREENS = (
    ScreenEntry("dashboard", "1", "Dashboard", "tui.screens.dashboard", "DashboardScreen"),
    ScreenEntry("models", "2", "Models", "tui.screens.models", "ModelsScreen"),
    ScreenEntry("datasets", "3", "Datasets", "tui.screens.datasets", "DatasetsScreen"),
    ScreenEntry("train", "4", "Train", "tui.screens.train", "TrainScreen"),
    ScreenEntry("jobs", "5", "Jobs", "tui.screens.jobs", "JobsScreen"),
    ScreenEntry("exports", "6", "Exports", "tui.screens.exports", "ExportsScreen"),
    ScreenEntry("chat", "7", "Chat", "tui.screens.chat", "ChatScreen"),
    ScreenEntry("server", "8", "Server", "tui.screens.server", "ServerScreen"),
)


def _lazy(entry: ScreenEntry) -> Callable[[], Screen[Any]]:
    return lambda: entry.load()()


@dataclass(frozen=True)
class Settings:
    poll_s: float = 1.0                # how often visible screens re-read jobs; 0: never (snapshots)
    workspace_label: str | None = None  # shown instead of the workspace path (snapshots)
    browse_from: Path | None = None     # where file pickers open (default: the current directory)
    probe: Probe = field(default=read_system)
    # where a server not started from here (systemd's) is looked for; None: nowhere (snapshots)
    server_probe: str | None = f"http://127.0.0.1:{DEFAULT_PORT}"
    server_metrics: Callable[[str], Any] | None = None  # None: the server's own /metrics


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
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (110, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(e.key, f"app.switch_mode('{e.mode}')", f"Go to {e.title}", show=False) for e in SCREENS),
        Binding("question_mark,f1", "app.help", "Help", key_display="?"),
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
        self.workspace = workspace
        self.settings = settings or Settings()
        self.pending_job: str | None = None  # a job the Jobs screen should select when shown
        self.pending_training: str | None = None  # a train job the Train screen should follow

    # -- navigation -------------------------------------------------------------------------
    def nav_items(self) -> list[tuple[str, str, str]]:
        return [(e.key, e.mode, e.title) for e in SCREENS]

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

    def action_help(self) -> None:
        from tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def run_screen_action(self, mode: str, action: str) -> None:
        """Go to a screen and run one of its actions (what the command palette's entries do)."""
        await self.switch_mode(mode)
        await self.screen.run_action(action)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: every key of every screen", "?", self.action_help)
        for entry in SCREENS:
            yield SystemCommand(f"Go to {entry.title}", f"key {entry.key}",
                                lambda e=entry: self.switch_mode(e.mode))
        for entry in SCREENS:
            for binding in screen_bindings(entry.load()):
                yield SystemCommand(f"{entry.title}: {binding.description}",
                                    f"key {binding.key} on the {entry.title} screen",
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
    return ApplianceApp(workspace).run() or 0
