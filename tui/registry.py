"""The TUI's screens: the one table the app's keys, the command palette and the help are made from.

Apart from `tui/app.py` so the help screen can list every screen without importing the app (which
imports the help screen: a cycle). Screens are loaded lazily, by module and class name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from textual.screen import Screen


@dataclass(frozen=True)
class ScreenEntry:
    mode: str
    key: str
    title: str
    module: str
    cls: str
    short: str = ""  # the navigation bar's name for it where the full titles do not fit

    @property
    def nav_title(self) -> str:
        return self.short or self.title

    def load(self) -> type[Screen[Any]]:
        return getattr(importlib.import_module(self.module), self.cls)


SCREENS = (
    ScreenEntry("dashboard", "1", "Dashboard", "tui.screens.dashboard", "DashboardScreen", "Dash"),
    ScreenEntry("models", "2", "Models", "tui.screens.models", "ModelsScreen"),
    ScreenEntry("datasets", "3", "Datasets", "tui.screens.datasets", "DatasetsScreen", "Data"),
    ScreenEntry("train", "4", "Train", "tui.screens.train", "TrainScreen"),
    ScreenEntry("jobs", "5", "Jobs", "tui.screens.jobs", "JobsScreen"),
    ScreenEntry("exports", "6", "Exports", "tui.screens.exports", "ExportsScreen"),
    ScreenEntry("chat", "7", "Chat", "tui.screens.chat", "ChatScreen"),
    ScreenEntry("server", "8", "Server", "tui.screens.server", "ServerScreen"),
    ScreenEntry("evals", "9", "Eval", "tui.screens.evals", "EvalsScreen"),
)
