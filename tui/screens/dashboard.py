"""The dashboard: this box (CPU, RAM, GPUs, disk, offline status), the workspace, and its jobs.

What the operator checks first over SSH: is anything running, did the last job work, is there room.
The system numbers come from the app's probe (psutil and nvidia-smi, never torch), read in a worker
on every poll; the artifact counts only when the screen is shown or refreshed (they scan the
workspace). The CPU gauge says `…` until a second sample exists (a first sample compares against
nothing). At 160 columns and more, the jobs stand beside the system status instead of below it.

The dashboard is the first screen: its reads start after the app's first frame is on the terminal
(`ApplianceApp.after_first_paint`), so their threads do not slow that frame down; it shows
`reading…` until they are done (0.1-0.2 s later on a loaded 2-core box).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from appliance import jobs
from appliance.workspace import KIND_DIRS, Workspace
from tui.feed import last_events, summary_line
from tui.screens.base import ApplianceScreen, message_room
from tui.system import SystemStatus
from tui.widgets import KeyedTable, bar, clip, clip_keeping_time, first_line

RECENT_JOBS = 8


@dataclass(frozen=True)
class JobsView:
    running: list[tuple[jobs.Job, str]] = field(default_factory=list)  # with their last progress
    recent: list[jobs.Job] = field(default_factory=list)


def read_jobs(ws: Workspace, now: float | None = None) -> JobsView:
    if not ws.exists():
        return JobsView()
    all_jobs = jobs.list_jobs(ws)
    running = [(j, summary_line(last_events(ws, j.id), now)) for j in all_jobs
               if j.state in ("queued", "running")]
    recent = [j for j in all_jobs if j.state not in ("queued", "running")][:RECENT_JOBS]
    return JobsView(running, recent)


def read_counts(ws: Workspace) -> dict[str, int]:
    if not ws.exists():
        return {}
    return {kind: len(ws.list(kind)) for kind in KIND_DIRS}


def system_lines(s: SystemStatus, workspace: str) -> str:
    ram = s.ram_used_gib / s.ram_total_gib if s.ram_total_gib else 0.0
    cpu = f"{bar(0)}     …" if s.cpu_percent is None else \
        f"{bar(s.cpu_percent / 100)} {s.cpu_percent:5.1f}%"
    lines = [f"CPU   {cpu} of {s.cpu_count} cores",
             f"RAM   {bar(ram)} {s.ram_used_gib:5.1f} / {s.ram_total_gib:.1f} GiB"]
    for g in s.gpus:
        used = g.memory_used_mib / g.memory_total_mib if g.memory_total_mib else 0.0
        busy = f", {g.utilization_pct:.0f}% busy" if g.utilization_pct is not None else ""
        lines.append(f"GPU {g.index} {bar(used)} {g.memory_used_mib / 1024:5.1f} / "
                     f"{g.memory_total_mib / 1024:.1f} GiB in use{busy}  {g.name}")
    if not s.gpus:
        lines.append(f"GPU   {s.gpu_note or 'none'}")
    lines.append(f"Disk  {s.disk_free_gib:.1f} GiB free of {s.disk_total_gib:.1f} GiB  ({workspace})")
    guard = "on" if s.offline_guard else "[b red]OFF[/]"
    env = "set" if s.offline_env else "[b red]missing[/]"
    blocked = f", [b red]{s.blocked_attempts} blocked attempts[/]" if s.blocked_attempts else ""
    lines.append(f"Net   offline guard {guard}, HF offline variables {env}{blocked}")
    return "\n".join(lines)


def counts_line(counts: dict[str, int]) -> str:
    if not counts:
        return "Workspace not created yet: [b]2[/] Models → [b]d[/] imports the default model " \
               "(or run `appliance demo`)"
    parts = ", ".join(f"{n} {KIND_DIRS[k] if n != 1 else k}" for k, n in counts.items())
    hint = "  ·  no models yet: [b]2[/] Models → [b]d[/] imports the default one" \
        if not counts.get("model") else ""
    return f"Workspace: {parts}{hint}"


class DashboardScreen(ApplianceScreen):
    MODE = "dashboard"
    SUB_TITLE = "Dashboard"
    POLL = True
    FILTER_TABLE = "recent"
    WIDE = 160  # from here on, two columns
    # textual annotates it `ClassVar[...] | None`, which mypy reads as an instance variable
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (WIDE, "-wide")]  # type: ignore[misc]
    DEFAULT_CSS = """
    DashboardScreen #system { height: auto; padding: 0 1; }
    DashboardScreen #counts { height: auto; padding: 0 1; margin-bottom: 1; }
    DashboardScreen DataTable { max-height: 8; }
    DashboardScreen #box, DashboardScreen #work { height: auto; }
    DashboardScreen.-wide #dash { layout: horizontal; }
    DashboardScreen.-wide #box, DashboardScreen.-wide #work { width: 1fr; }
    DashboardScreen.-wide DataTable { max-height: 16; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "open_job", "Open job"),
    ]

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="dash"):
            with Vertical(id="box"):
                yield Static("System", classes="heading")
                yield Static("reading…", id="system")
                yield Static("", id="counts")
            with Vertical(id="work"):
                yield Static("Running jobs", classes="heading")
                yield KeyedTable("job", "state", "progress", id="running")
                yield Static("Recent jobs", classes="heading")
                yield KeyedTable("job", "state", "message", id="recent")

    def reload(self) -> None:
        self.appliance.after_first_paint(self._read_all)

    def _read_all(self) -> None:
        self.background(lambda: read_counts(self.ws), self._show_counts, group="counts")
        self.poll()

    def poll(self) -> None:
        if not self.appliance.painted:
            return  # the first read, after the first frame, is on its way (`reload`)
        probe, clock = self.appliance.settings.probe, self.appliance.settings.clock
        self.background(lambda: probe(self.ws), self._show_system, group="system",
                        title="Could not read the system status", skip_if_busy=True)
        self.background(lambda: read_jobs(self.ws, clock()), self._show_jobs, group="jobs",
                        skip_if_busy=True)

    def _show_system(self, status: SystemStatus) -> None:
        self.query_one("#system", Static).update(system_lines(status, self.appliance.workspace_label()))

    def _show_counts(self, counts: dict[str, int]) -> None:
        self.query_one("#counts", Static).update(counts_line(counts))

    def _show_jobs(self, view: JobsView) -> None:
        # the id names the kind; the last column gets what is left of the width, never more
        width = self.app.size.width
        room = message_room(width // 2 if width >= self.WIDE else width,
                            [j.id for j, _ in view.running] + [j.id for j in view.recent])
        self.query_one("#running", KeyedTable).fill(
            [(j.id, (j.id, j.state, clip_keeping_time(progress, room)))
             for j, progress in view.running])
        self.query_one("#recent", KeyedTable).fill(
            [(j.id, (j.id, j.state, clip(first_line(j.message, 200), room))) for j in view.recent])
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "open_job" and self.query("#running") and \
                self._job_table().selected_key() is None:
            return None  # greyed out: no job to open
        return super().check_action(action, parameters)

    def _job_table(self) -> KeyedTable:
        return self.focused if isinstance(self.focused, KeyedTable) else \
            self.query_one("#running", KeyedTable)

    def action_open_job(self) -> None:
        key = self._job_table().selected_key()
        if key:
            self.appliance.open_job(key)

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.appliance.open_job(str(event.row_key.value))
