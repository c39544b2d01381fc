"""Jobs: every job in the workspace (started here or from the CLI), the selected one's log, cancel
and resume.

Jobs are separate processes recorded in SQLite (`appliance.jobs`), so this screen only reads and
asks: it lists them, follows the selected job's events file from where it last read, and writes
the cancel / resume requests the CLI would. Closing the UI leaves every job running. Cancel asks
first (as delete does); the keys that cannot apply to the selected job (resume a running one,
cancel a finished one) are greyed out. The selected running job's line says what it is doing and,
when that has no counts, for how long.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, RichLog, Static

from appliance import jobs
from appliance.textout import format_event
from appliance.workspace import Workspace
from tui.dialogs import ConfirmDialog
from tui.feed import Event, EventTail, collapse, format_eta, last_events, summary_line
from tui.screens.base import ApplianceScreen, message_room
from tui.widgets import ELAPSED_TAIL, KeyedTable, clip, first_line, rate

LOG_LINES = 5000


def progress_line(event: Event) -> str:
    """A training step in a line that fits 80 columns; other progress as the CLI prints it."""
    if not isinstance(event.get("loss"), int | float):
        return format_event({k: v for k, v in event.items() if k != "collapsed"})
    parts = [f"step {event.get('done')}/{event.get('total')}", f"loss {event['loss']:.4f}"]
    if isinstance(event.get("lr"), int | float):
        parts.append(f"lr {event['lr']:.1e}")
    if isinstance(event.get("tokens_per_s"), int | float):
        parts.append(f"{rate(event['tokens_per_s'])} tok/s")
    if isinstance(event.get("eta_s"), int | float):
        parts.append(f"ETA {format_eta(event['eta_s'])}")
    return " ".join(parts)


def event_lines(events: list[Event]) -> list[str]:
    """Log lines for a batch of events; runs of progress events show as their last one."""
    lines: list[str] = []
    for event in collapse(events):
        kind = event.get("type")
        text = progress_line(event) if kind == "progress" else str(event.get("text", "")) \
            if kind == "traceback" else format_event(event)
        if event.get("collapsed"):
            text += f" (+{event['collapsed']})"
        lines.extend(text.splitlines() or [""])
    return lines


def job_line(job: jobs.Job, doing: str = "") -> Text:
    """`ID  kind state, attempt N, pid P: message`, then, when a running job is in a stage
    without counts (the log's last line would look frozen), what it does and for how long."""
    pid = f", pid {job.pid}" if job.pid and job.state in ("queued", "running") else ""
    message = f": {first_line(job.message, 200)}" if job.message else ""
    text = Text.assemble(f"{job.id}  ", (job.kind, "bold"),
                         f" {job.state}, attempt {job.attempt}{pid}{message}")
    if ELAPSED_TAIL.search(doing) and job.state in ("queued", "running"):
        text.append(f"\nnow: {doing}")
    return text


@dataclass
class JobsRead:
    jobs: list[jobs.Job]
    tail: EventTail | None      # the tail that was read, from `start` to `end`
    start: int
    end: int
    events: list[Event]
    doing: dict[str, str] = field(default_factory=dict)  # running job id -> what it does now


def read_jobs(ws: Workspace, tail: EventTail | None, now: float | None = None) -> JobsRead:
    if not ws.exists():
        return JobsRead([], tail, 0, 0, [])
    start = tail.offset if tail else 0
    events, end = tail.read_from(start) if tail else ([], 0)
    all_jobs = jobs.list_jobs(ws)
    doing = {j.id: summary_line(last_events(ws, j.id), now) for j in all_jobs
             if j.state in ("queued", "running")}  # the table shows it as the Dashboard does
    return JobsRead(all_jobs, tail, start, end, events, doing)


class JobsScreen(ApplianceScreen):
    MODE = "jobs"
    SUB_TITLE = "Jobs"
    POLL = True
    FILTER_TABLE = "jobs"
    DEFAULT_CSS = """
    JobsScreen #jobs { max-height: 10; }
    JobsScreen #job { height: auto; max-height: 3; padding: 0 1; background: $panel; }
    JobsScreen RichLog { height: 1fr; border: round $panel; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("c", "cancel", "Cancel job"),
        Binding("u", "resume", "Resume job"),
        Binding("t", "train_view", "Training view"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.tail: EventTail | None = None
        self.by_id: dict[str, jobs.Job] = {}  # as last read

    def compose_body(self) -> ComposeResult:
        yield KeyedTable("job", "state", "message", id="jobs")  # the id names the kind
        yield Static("no job selected", id="job")
        # wrapped, not cut at the edge: at 80 columns a stage line or an error is longer; RichLog's
        # default min_width (78) is wider than the box at 80 columns (a sideways scrollbar)
        yield RichLog(max_lines=LOG_LINES, wrap=True, markup=False, highlight=False, min_width=20,
                      id="log")

    def selected(self) -> str | None:
        found = self.query("#jobs")
        return found.first(KeyedTable).selected_key() if found else None

    def reload(self) -> None:
        tail, ws, clock = self.tail, self.ws, self.appliance.settings.clock
        self.background(lambda: read_jobs(ws, tail, clock()), self._show, group="jobs")

    def poll(self) -> None:
        tail, ws, clock = self.tail, self.ws, self.appliance.settings.clock
        self.background(lambda: read_jobs(ws, tail, clock()), self._show, group="jobs",
                        skip_if_busy=True)

    def _show(self, read: JobsRead) -> None:
        table = self.query_one("#jobs", KeyedTable)
        room = message_room(self.app.size.width, [j.id for j in read.jobs])
        table.fill([(j.id, (j.id, j.state, clip(read.doing.get(j.id) or first_line(j.message, 200), room)))
                    for j in read.jobs])
        self.by_id = {j.id: j for j in read.jobs}
        wanted = self.appliance.pending_job
        if wanted and table.select_key(wanted):
            self.appliance.pending_job = None
            table.focus()
        tail = self.tail
        if tail is not None and read.tail is tail and tail.offset == read.start:
            tail.offset = read.end
            log = self.query_one("#log", RichLog)
            for line in event_lines(read.events):
                log.write(line)
        self._describe(read.doing)
        if self.selected() != (tail.job_id if tail else None):
            self._follow(self.selected())
        self.refresh_bindings()

    def _describe(self, doing: dict[str, str]) -> None:
        job = self.by_id.get(self.selected() or "")
        self.query_one("#job", Static).update(
            job_line(job, doing.get(job.id, "")) if job else
            "no jobs yet" if not self.by_id else "no job matches the filter (escape clears it)")

    def _follow(self, job_id: str | None) -> None:
        """Start tailing another job: its log is read from the beginning."""
        self.query_one("#log", RichLog).clear()
        self.tail = EventTail(self.ws, job_id) if job_id else None
        if self.tail is not None:
            self.reload()

    @on(DataTable.RowHighlighted, "#jobs")
    def _highlighted(self) -> None:
        if self.selected() != (self.tail.job_id if self.tail else None):
            self._follow(self.selected())
            self._describe({})

    # -- actions ---------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        job = self.by_id.get(self.selected() or "")
        applies = {"cancel": job is not None and job.state in ("queued", "running"),
                   "resume": job is not None and job.state in jobs.RESUMABLE,
                   "train_view": job is not None and job.kind == "train"}
        if action in applies:
            return True if applies[action] else None  # None: shown greyed out
        return super().check_action(action, parameters)

    def _act(self, what: str, func: Callable[[Workspace, str], jobs.Job]) -> None:
        job_id, ws = self.selected(), self.ws
        if job_id is None:
            self.notify("no job selected", severity="warning")
            return

        def work() -> jobs.Job:
            return func(ws, job_id)

        def done(job: jobs.Job) -> None:
            self.notify(f"{job.id}: {job.state}" + (" (cancel requested; it saves its state "
                        "first)" if what == "cancel" else ""), title=what.capitalize())
            self.reload()

        self.background(work, done, group=what, title=f"Could not {what} the job", modal=True)

    def action_cancel(self) -> None:
        job = self.by_id.get(self.selected() or "")
        if job is not None:
            confirm_cancel(self, job.id, job.kind, lambda: self._act("cancel", jobs.cancel))

    def action_resume(self) -> None:
        self._act("resume", jobs.resume)

    def action_train_view(self) -> None:
        job_id = self.selected()
        if job_id is None:
            return
        job = self.by_id.get(job_id)
        if job is None or job.kind != "train":
            self.notify("the training view follows training jobs", severity="warning")
            return
        self.appliance.open_training(job_id)


CANCEL_NOTES = {
    "train": "It saves a checkpoint, then stops; resume (u) continues from that checkpoint.",
    "serve": "The server stops; answers in progress are cut off.",
}


def confirm_cancel(screen: ApplianceScreen, job_id: str, kind: str, cancel: Callable[[], None]
                   ) -> None:
    """Ask before cancelling a job (a training run may have hours in it), then `cancel()`."""
    note = CANCEL_NOTES.get(kind, "It stops at its next check; resume (u) starts it again.")

    def answered(yes: bool | None) -> None:
        if yes:
            cancel()

    screen.app.push_screen(ConfirmDialog(f"Cancel {kind} job {job_id}?", note,
                                         confirm="Cancel job"), answered)
