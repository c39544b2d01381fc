"""What every top-level screen shares: header, navigation bar, footer, background reads, polling,
the list filter and the way back.

`background(work, done)` is the one way a screen touches the core: `work` runs in a thread worker
(disk, SQLite, a tokenizer, `nvidia-smi`), `done` runs on the UI thread with its result, and any
failure reaches the operator through the app's error display with its title and hint. A newer
read of the same group supersedes an older one, whose result is then dropped.

Screens that follow something (jobs, the dashboard) poll on a timer only while they are visible.
A running job that reports stages (merge, export, verify: `appliance.progress`) is shown on two
lines, the artifact it works on, then a text gauge of its current stage when that stage's size is
known (its name and how long it has taken when not); other jobs keep a one-line summary, which
also says for how long a job has been quiet. Times come from the app's clock (`Settings.clock`).

`/` opens a filter under the screen's list (the focused table, else the screen's main one): the
rows without the typed text in a cell hide as you type, enter goes back to the list with the filter
kept (a poll does not undo it), `escape` clears it. `escape` otherwise leaves a text box, and from
anywhere else goes back to the screen shown before. Which keys apply to the selected row is
re-checked as the selection moves, so the footer greys out the ones that cannot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from rich.text import Text
from textual import events as textual_events
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Header, Input, Label, Static, TextArea
from textual.worker import Worker, get_current_worker

from appliance import jobs, profile, progress, stages
from appliance.workspace import ArtifactRecord, Workspace
from tui.dialogs import ConfirmDialog
from tui.feed import Event, elapsed, last_events, stage_started, summary_line
from tui.settings import Settings
from tui.widgets import KeyedTable, NavBar, bar


class Cockpit(Protocol):
    """What a screen uses of the app (`tui.app.ApplianceApp`): a protocol, so the screens never
    import the app module, which imports them."""

    workspace: Workspace
    settings: Settings
    pending_job: str | None
    pending_training: str | None
    painted: bool

    def nav_items(self) -> list[tuple[str, str, str, str]]: ...
    def workspace_label(self) -> str: ...
    def open_job(self, job_id: str) -> None: ...
    def open_training(self, job_id: str) -> None: ...
    def go_back(self) -> None: ...
    def after_first_paint(self, callback: Callable[[], object]) -> None: ...
    def show_error(self, error: BaseException, *, title: str = "Error", modal: bool = False) -> None: ...

T = TypeVar("T")


GAUGE_WIDTH = 20
STATE_WIDTH = max(len(s) for s in ("queued", "running", *jobs.TERMINAL))


def message_room(width: int, job_ids: list[str]) -> int:
    """What the last column of a (job, state, text) table may take at terminal `width`, cell
    padding included, so the table never scrolls sideways (the whole text is shown elsewhere)."""
    return max(16, width - max((len(i) for i in job_ids), default=0) - STATE_WIDTH - 9)


@dataclass(frozen=True)
class Running:
    """A queued or running job: its summary line, and its current stage if it reports stages
    (with the time it began, for a stage of unknown size), and the clock's time when read."""

    job: jobs.Job
    line: str
    stage: Event | None = None
    stage_since: float | None = None
    now: float | None = None


@dataclass
class Activity:
    """The jobs a screen follows: those of its kinds still running, and watched ones that ended."""

    active: list[Running] = field(default_factory=list)
    finished: list[jobs.Job] = field(default_factory=list)


def current_stage_index(events: list[Event]) -> int | None:
    """Where the last staged progress event of the job's current attempt is (none before a state
    change: a resumed job's old stage is not shown as if it were now)."""
    for i in range(len(events) - 1, -1, -1):
        if events[i].get("type") == "state":
            return None
        if progress.is_staged(events[i]):
            return i
    return None


def current_stage(events: list[Event]) -> Event | None:
    index = current_stage_index(events)
    return None if index is None else events[index]


def running_from(job: jobs.Job, events: list[Event], now: float | None) -> Running:
    index = current_stage_index(events)
    if index is None:
        return Running(job, summary_line(events, now), now=now)
    return Running(job, summary_line(events, now), events[index], stage_started(events, index), now)


def read_activity(ws: Workspace, kinds: tuple[str, ...], watched: set[str],
                  clock: Callable[[], float] | None = None) -> Activity:
    if not ws.exists():
        return Activity()
    all_jobs = [j for j in jobs.list_jobs(ws) if j.kind in kinds or j.id in watched]
    now = clock() if clock else None
    active = [running_from(j, last_events(ws, j.id), now) for j in all_jobs
              if j.state in ("queued", "running")]
    return Activity(active, [j for j in all_jobs if j.id in watched and j.state in jobs.TERMINAL])


def sorted_records(ws: Workspace, kind: str) -> list[ArtifactRecord]:
    """A kind's artifacts by name (a stable order: a run's exports stay together); none, and
    nothing created, when there is no workspace yet."""
    return sorted(ws.list(kind), key=lambda r: r.name) if ws.exists() else []


def record_names(ws: Workspace, kind: str) -> list[str]:
    """A kind's artifact names as the workspace lists them; none when there is no workspace yet."""
    return [r.name for r in ws.list(kind)] if ws.exists() else []


def stage_lines(run: Running) -> Text:
    """`export ID · ARTIFACT (1/2 done)`, then `  ████░░░░ quantizing to Q8_0 120/272 tensors`
    (no gauge while the stage's size is unknown: `  converting to GGUF F16… 0m42s`)."""
    event = run.stage or {}
    text = Text.assemble((run.job.kind, "bold"), f" {run.job.id}")
    if what := progress.artifacts(event):
        text.append(f" · {what}")
    label, share = str(event.get("label") or event.get("stage", "")), progress.fraction(event)
    if share is None:
        return text.append(f"\n  {label}…{elapsed(run.stage_since, run.now)}")
    return text.append(f"\n  {bar(share, GAUGE_WIDTH)} {label} {progress.counts(event)}")


def activity_text(active: list[Running]) -> Text:
    lines = [stage_lines(r) if r.stage is not None
             else Text.assemble((r.job.kind, "bold"), f" {r.job.id} {r.job.state}: {r.line}")
             for r in active]
    return Text("\n").join(lines)


TEXT_BOXES = (Input, TextArea)
FILTER_CSS = """
ApplianceScreen #filter-bar { height: 1; display: none; padding: 0 1; background: $panel; }
ApplianceScreen #filter-bar Label { width: auto; text-style: bold; }
ApplianceScreen #filter { width: 1fr; border: none; height: 1; padding: 0 1; }
ApplianceScreen #filter-count { width: auto; color: $text-muted; }
"""


class ApplianceScreen(Screen[None]):
    MODE: ClassVar[str] = ""
    POLL: ClassVar[bool] = False  # call `poll` on the app's poll interval while visible
    JOB_KINDS: ClassVar[tuple[str, ...]] = ()  # jobs this screen starts and follows (#activity)
    FILTER_TABLE: ClassVar[str | None] = None  # the list `/` filters when no list has focus
    # action -> the job kind it starts: greyed out on an edge install (stages.FULL_PROFILE_KINDS)
    FULL_PROFILE_ACTIONS: ClassVar[dict[str, str]] = {}
    DEFAULT_CSS = FILTER_CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "reload", "Refresh", show=False),
        Binding("slash", "filter", "Filter", key_display="/"),
        Binding("escape", "back", "Back: close the filter, leave the text box, or the screen "
                "before", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._timer: Timer | None = None
        self._workers: dict[str, Worker[None]] = {}
        self.watched: set[str] = set()  # jobs started here: their outcome is announced
        self._filtered: KeyedTable | None = None  # the list the filter bar applies to
        self._tasks: dict[str, tuple[str, float]] = {}  # local work shown on #activity: label, start
        self._ticker: Timer | None = None
        self._jobs_shown: list[Running] = []  # the running jobs #activity shows

    @property
    def appliance(self) -> Cockpit:
        return self.app  # type: ignore[return-value]

    @property
    def ws(self) -> Workspace:
        return self.appliance.workspace

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar(self.appliance.nav_items(), self.MODE)
        yield from self.compose_body()
        with Horizontal(id="filter-bar"):
            yield Label("/")
            box = Input(placeholder="filter: type to narrow the list; enter keeps it, esc clears it",
                        compact=True, id="filter")
            box.display = False
            yield box
            yield Static("", id="filter-count")
        yield Footer(compact=True)

    def compose_body(self) -> ComposeResult:
        yield from ()

    # -- data ----------------------------------------------------------------------------
    def reload(self) -> None:
        """Read what the screen shows (in workers); called on show, on `r`, and on each poll."""

    def action_reload(self) -> None:
        self.reload()

    def now(self) -> float:
        return self.appliance.settings.clock()

    # -- focus, filter, back -------------------------------------------------------------------
    # Both from the focus as it is now: the old widget's blur can arrive after the new one's focus
    # (the bar lost `alt+` while the filter box had the focus).
    def on_descendant_focus(self, event: textual_events.DescendantFocus) -> None:
        self._typing(isinstance(self.focused, TEXT_BOXES))

    def on_descendant_blur(self, event: textual_events.DescendantBlur) -> None:
        self._typing(isinstance(self.focused, TEXT_BOXES))

    def _typing(self, typing: bool) -> None:
        """The navigation bar says `alt+` while the digits type into a text box."""
        for nav in self.query(NavBar):
            nav.set_typing(typing)

    def filter_target(self) -> KeyedTable | None:
        """The list `/` filters: the focused one, else the screen's main one (if it has one)."""
        if isinstance(self.focused, KeyedTable):
            return self.focused
        if self._filtered is not None:
            return self._filtered
        if self.FILTER_TABLE is None:
            return None
        try:
            return self.query_one(f"#{self.FILTER_TABLE}", KeyedTable)
        except NoMatches:
            return None

    def action_filter(self) -> None:
        table = self.filter_target()
        if table is None:
            return
        self._filtered = table
        self.query_one("#filter-bar").display = True
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = table.filter_text
        box.focus()
        self._count_filtered()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        if self._filtered is not None:
            self._filtered.set_filter(event.value)
            self._count_filtered()
            self.on_selection_changed()

    @on(Input.Submitted, "#filter")
    def _filter_kept(self) -> None:
        table = self._filtered
        if table is None:
            return
        if not table.filter_text:
            self.close_filter()
        table.focus()

    def _count_filtered(self) -> None:
        table = self._filtered
        if table is not None:
            self.query_one("#filter-count", Static).update(f"{table.row_count} of {table.total}")

    def close_filter(self) -> bool:
        """Clear and close the filter; False if there was none."""
        table = self._filtered
        if table is None:
            return False
        self._filtered = None
        table.set_filter("")
        self.query_one("#filter-bar").display = False
        self.query_one("#filter", Input).display = False
        table.focus()
        self.on_selection_changed()
        return True

    def action_back(self) -> None:
        """`escape`: close the filter; else leave a text box (so letters and digits act again);
        else go back to the screen shown before."""
        if self.close_filter():
            return
        if isinstance(self.focused, TEXT_BOXES):
            self.set_focus(None)
            return
        self.appliance.go_back()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "filter":
            return self.filter_target() is not None
        if action in self.FULL_PROFILE_ACTIONS and self.edge_profile:
            return None  # shown greyed out: the edge profile cannot run it
        return True

    @property
    def edge_profile(self) -> bool:
        """This install is the edge profile: no training, merging, exporting or parity checks."""
        return self.appliance.settings.profile == profile.EDGE

    def full_profile_note(self, kind: str) -> str:
        """One line saying why an action is greyed out on an edge install."""
        what = stages.FULL_PROFILE_KINDS.get(kind, kind)
        return f"{what} needs the full profile (this install is the edge profile)"

    def on_selection_changed(self) -> None:
        """The selected row changed: keys that depend on it are re-checked (and greyed out)."""
        self.refresh_bindings()

    @on(DataTable.RowHighlighted)
    def _row_moved(self) -> None:
        self.on_selection_changed()

    def on_screen_resume(self) -> None:
        self.reload()
        if (self.POLL or self.JOB_KINDS) and self.appliance.settings.poll_s > 0:
            if self._timer is None:
                self._timer = self.set_interval(self.appliance.settings.poll_s, self.poll)
            self._timer.resume()

    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    def poll(self) -> None:
        self.refresh_activity()

    # -- work done here, in a worker, that takes a while ----------------------------------------
    def start_task(self, key: str, label: str) -> None:
        """Show `label… 0m12s` on the activity line until `end_task(key)`, the time ticking, so
        a long read (hashing a model, importing a dataset) never looks frozen."""
        self._tasks[key] = (label, self.now())
        if self._ticker is None:
            self._ticker = self.set_interval(1.0, self._draw_activity)
        self._draw_activity()

    def update_task(self, key: str, label: str) -> None:
        if key in self._tasks:
            self._tasks[key] = (label, self._tasks[key][1])
            self._draw_activity()

    def end_task(self, key: str) -> None:
        self._tasks.pop(key, None)
        if not self._tasks and self._ticker is not None:
            self._ticker.stop()
            self._ticker = None
        self._draw_activity()

    def _draw_activity(self) -> None:
        try:
            line = self.query_one("#activity", Static)
        except NoMatches:
            return
        now = self.now()
        lines = [Text(f"{label.rstrip(' .…')}…{elapsed(since, now)}")
                 for label, since in self._tasks.values()]
        if self._jobs_shown:
            lines.append(activity_text(self._jobs_shown))
        line.update(Text("\n").join(lines))
        line.display = bool(lines)

    # -- jobs this screen starts -------------------------------------------------------------
    def job_started(self, job: jobs.Job) -> None:
        self.watched.add(job.id)
        self.notify(f"{job.kind} job {job.id} started; it goes on if the UI closes (5 Jobs shows "
                    "its log)", title="Job started")
        self.refresh_activity()

    def refresh_activity(self) -> None:
        if not self.JOB_KINDS:
            return
        kinds, watched, ws, clock = self.JOB_KINDS, set(self.watched), self.ws, \
            self.appliance.settings.clock
        self.background(lambda: read_activity(ws, kinds, watched, clock), self._show_activity,
                        group="activity", skip_if_busy=True)

    def _show_activity(self, activity: Activity) -> None:
        self._jobs_shown = activity.active
        self._draw_activity()
        for job in activity.finished:
            self.watched.discard(job.id)
            ok = job.state == "succeeded"
            self.notify(f"{job.kind} job {job.id} {job.state}" + (f": {job.message}" if not ok else ""),
                        title="Job finished" if ok else "Job did not succeed",
                        severity="information" if ok else "error", timeout=12, markup=False)
        if activity.finished:
            self.reload()


    def background(self, work: Callable[[], T], done: Callable[[T], Any] | None = None, *,
                   group: str, title: str = "Could not read the workspace",
                   modal: bool = False, skip_if_busy: bool = False) -> Worker[None] | None:
        """Run `work` in a thread; `done(result)` on the UI thread unless superseded.

        `skip_if_busy`: if a worker of this group still runs, start nothing (a poll must not
        cancel the read before it, or a slow disk would starve the screen)."""
        app, cockpit = self.app, self.appliance
        running = self._workers.get(group)
        if skip_if_busy and running is not None and not running.is_finished:
            return None

        def run() -> None:
            worker = get_current_worker()
            try:
                result = work()
            except Exception as exc:  # every failure is shown; none kills the UI
                if not worker.is_cancelled:
                    app.call_from_thread(cockpit.show_error, exc, title=title, modal=modal)
                return
            if done is not None and not worker.is_cancelled:
                app.call_from_thread(done, result)

        worker = self.run_worker(run, thread=True, group=group, exclusive=True,
                                 exit_on_error=False, description=group)
        self._workers[group] = worker
        return worker


def artifact_css(screen: str, list_width: int, details_id: str = "details") -> str:
    """An `ArtifactScreen`'s layout: the table above its details, beside them when wide."""
    return f"""
    {screen} .list {{ height: auto; max-height: 10; }}
    {screen}.-wide .list {{ width: {list_width}; height: 1fr; max-height: 100%; }}
    {screen} #{details_id}-box {{ height: 1fr; border: round $panel; padding: 0 1; }}
    """


class ArtifactScreen(ApplianceScreen):
    """The artifacts of one kind: a table of them beside (or above) the selected one's details,
    the activity line below; `x` deletes the selected one after a confirmation."""

    KIND: ClassVar[str] = ""
    COLUMNS: ClassVar[tuple[str, ...]] = ()
    DETAILS_ID: ClassVar[str] = "details"  # the details pane (in #<id>-box) and its read's group
    DETAILS_MARKUP: ClassVar[bool] = True
    EMPTY: ClassVar[str] = ""  # the details pane when there are none yet: how to make one
    DELETE_NOTE: ClassVar[str] = ""  # what deleting removes, for the confirmation
    ROW_ACTIONS: ClassVar[tuple[str, ...]] = ("delete",)  # actions on the selected artifact

    def __init__(self) -> None:
        super().__init__()
        self.select_after: str | None = None  # an artifact just made: selected once listed

    @property
    def table_id(self) -> str:
        return f"{self.KIND}s"

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="split"):
            with Vertical(classes="list"):
                yield KeyedTable(*self.COLUMNS, id=self.table_id)
            with VerticalScroll(id=f"{self.DETAILS_ID}-box"):
                yield Static(f"no {self.KIND} selected", id=self.DETAILS_ID,
                             markup=self.DETAILS_MARKUP)
        yield Static("", id="activity")

    def selected(self) -> str | None:
        try:
            return self.query_one(f"#{self.table_id}", KeyedTable).selected_key()
        except NoMatches:  # not composed yet
            return None

    def reload(self) -> None:
        ws, kind = self.ws, self.KIND
        self.background(lambda: sorted_records(ws, kind), self._show, group="list")
        self.refresh_activity()

    def row(self, record: ArtifactRecord) -> tuple[Any, ...]:
        """The table's cells for one artifact."""
        return (record.name,)

    def read_details(self, path: Path) -> Any:
        """What the details pane shows for the artifact at `path` (runs in a worker)."""
        return path.name

    def _show(self, records: list[ArtifactRecord]) -> None:
        table = self.query_one(f"#{self.table_id}", KeyedTable)
        table.fill([(r.name, self.row(r)) for r in records])
        if self.select_after and table.select_key(self.select_after):
            self.select_after = None
        if not records:
            self.query_one(f"#{self.DETAILS_ID}", Static).update(self.EMPTY)
        self.on_selection_changed()

    def filter_target(self) -> KeyedTable | None:
        found = self.query(f"#{self.table_id}")
        return super().filter_target() or (found.first(KeyedTable) if found else None)

    def on_selection_changed(self) -> None:
        super().on_selection_changed()
        self._details()

    def _details(self) -> None:
        name, ws, kind = self.selected(), self.ws, self.KIND
        if name is not None:
            self.background(lambda: self.read_details(ws.artifact_dir(kind, name)),
                            self.query_one(f"#{self.DETAILS_ID}", Static).update,
                            group=self.DETAILS_ID)
        elif self.query_one(f"#{self.table_id}", KeyedTable).total:
            self.query_one(f"#{self.DETAILS_ID}", Static).update(
                f"no {self.KIND} matches the filter (escape clears it)")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.ROW_ACTIONS and self.selected() is None:
            return None  # shown greyed out: nothing selected
        return super().check_action(action, parameters)

    def action_delete(self) -> None:
        name, kind = self.selected(), self.KIND
        if name is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                ws = self.ws
                self.background(lambda: ws.remove(kind, name), lambda _: self.deleted(name),
                                group="delete", title="Could not delete", modal=True)

        self.app.push_screen(ConfirmDialog(f"Delete {kind} {name}?", self.DELETE_NOTE), answered)

    def deleted(self, name: str) -> None:
        self.reload()
