"""What the TUI is run with: injected so tests and snapshots use small real workspaces and fixed
numbers. Apart from `tui/app.py` so the screens can name its type without importing the app
(which imports the screens)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import profile
from appliance.runtime import DEFAULT_PORT
from tui.system import Probe, read_system


@dataclass(frozen=True)
class Settings:
    poll_s: float = 1.0                # how often visible screens re-read jobs; 0: never (snapshots)
    workspace_label: str | None = None  # shown instead of the workspace path (snapshots)
    browse_from: Path | None = None     # where file pickers open (default: the current directory)
    probe: Probe = field(default=read_system)
    # where a server not started from here (systemd's) is looked for; None: nowhere (snapshots)
    server_probe: str | None = f"http://127.0.0.1:{DEFAULT_PORT}"
    server_metrics: Callable[[str], Any] | None = None  # None: the server's own /metrics
    clock: Callable[[], float] = time.time  # "now" for elapsed times (tests fix it)
    prefs_path: Path | None = None  # where the theme choice is kept; None: nowhere (tests)
    # `full` or `edge` (appliance.profile): on edge, what needs training is greyed out with a note
    profile: str = field(default_factory=profile.current)
