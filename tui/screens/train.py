"""Train: a form that validates as you type and shows the memory planner's verdict, then a live
view of the job (loss and eval loss, learning rate, tokens/s, GPU memory, ETA), cancel and resume.

The form's logic is `tui.trainform` (pure, run on every keystroke); starting queues the same `train`
job as `appliance train`, a detached process. The live view follows any training job (one started
here, from the Jobs screen, or from the CLI): each poll reads the new events in a worker and the
chart redraws once per poll, so a job emitting hundreds of events a second costs a bounded number
of redraws.

The head never shows a stale estimate: once the steps are done it says what the job does instead
(a stage the job reports, with its counts or how long it has taken; else `finishing…` and the time
since the last step), and after a resume it drops the old attempt's ETA until the new attempt's
first step. Cancel asks first. The focused field's label is marked `▸` and the checkbox reads
`[X]`/`[ ]`, so neither depends on colour; the form stops widening at 110 columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar
from weakref import WeakKeyDictionary

from rich.markup import escape
from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, ContentSwitcher, Input, Label, Select, Static

from appliance import jobs
from appliance.stages.train import planner
from appliance.stages.train.request import DEFAULT_RECIPE
from appliance.workspace import Workspace
from tui import trainform
from tui.feed import Event, EventTail, TrainProgress, format_eta
from tui.screens.base import ApplianceScreen
from tui.trainform import FORM_KEYS, HERE, FormState, TrainChoices
from tui.widgets import LineChart, TickBox, rate

SERIES = {"loss": "cyan", "eval loss": "bold yellow"}
_OFFERED: WeakKeyDictionary[Select[str], list[tuple[str, str]]] = WeakKeyDictionary()


@dataclass
class LiveRead:
    job: jobs.Job
    tail: EventTail
    start: int
    end: int
    events: list[Event]


def read_live(ws: Workspace, tail: EventTail, start: int) -> LiveRead:
    events, end = tail.read_from(start)
    return LiveRead(jobs.get(ws, tail.job_id), tail, start, end, events)


def newest_active_training(ws: Workspace) -> str | None:
    if not ws.exists():
        return None
    return next((j.id for j in jobs.list_jobs(ws)
                 if j.kind == "train" and j.state in ("queued", "running")), None)


def live_head(p: TrainProgress) -> str:
    parts = [f"[b]{p.job_id}[/] {p.state or '…'}", f"step {p.step}/{p.total or '?'}"]
    if p.loss:
        parts.append(f"loss {p.loss[-1][1]:.4f}")
    if p.lr is not None:
        parts.append(f"lr {p.lr:.2e}")
    if p.tokens_per_s is not None:
        parts.append(f"{rate(p.tokens_per_s)} tok/s")
    if p.gpu_mem_gib is not None:
        parts.append(f"GPU mem {p.gpu_mem_gib:.2f} GiB")
    if p.state in ("queued", "running"):
        doing = p.doing()
        parts.append(escape(doing) if doing else f"ETA {format_eta(p.eta_s)}")
    return " · ".join(parts)


def live_foot(p: TrainProgress) -> str:
    lines = []
    if p.eval_loss:
        step, last = p.eval_loss[-1]
        lines.append(f"eval loss {last:.4f} at step {step:g} (first {p.eval_loss[0][1]:.4f}, "
                     f"best {min(v for _, v in p.eval_loss):.4f})")
    if p.state in jobs.TERMINAL and p.message:
        lines.append(f"{p.state}: {p.message}")
    elif p.last_log:
        lines.append(p.last_log)
    return "\n".join(lines) or "waiting for the first event…"


def plan_text(checked: trainform.Checked) -> Text:
    """The planner's verdict, its last line (fits / does NOT fit ...) in green or red."""
    *body, last = checked.plan.splitlines() or [""]
    text = Text("\n".join(body) + ("\n" if body else ""), style="dim")
    style = "dim" if checked.fits is None else "bold green" if checked.fits else "bold red"
    return text + Text(last, style=style)


class TrainScreen(ApplianceScreen):
    MODE = "train"
    SUB_TITLE = "Train"
    POLL = True
    DEFAULT_CSS = """
    TrainScreen #views { height: 1fr; }
    TrainScreen #form { padding: 0 1; height: 1fr; max-width: 110; }
    TrainScreen Grid { height: auto; grid-size: 4; grid-columns: 16 1fr 16 1fr; grid-gutter: 0 1; }
    TrainScreen Grid > * { height: 1; }
    TrainScreen Label { color: $text-muted; }
    TrainScreen Label.-focused { color: $text; text-style: bold; }
    TrainScreen #l-force { width: 1fr; text-align: right; }
    TrainScreen #more { height: 1; margin-top: 1; }
    TrainScreen #more Label { width: 17; }
    TrainScreen #extras { width: 1fr; }
    TrainScreen Input.-invalid { color: $error; text-style: bold; }
    TrainScreen #problems { height: auto; margin-top: 1; }
    TrainScreen #plan, TrainScreen #following { height: auto; color: $text-muted; }
    TrainScreen #start { margin-top: 1; }
    TrainScreen #live { padding: 0 1; }
    TrainScreen #live-head, TrainScreen #live-foot { height: auto; }
    TrainScreen LineChart { height: 1fr; min-height: 6; border: round $panel; }
    """
    FULL_PROFILE_ACTIONS: ClassVar[dict[str, str]] = {"start": "train"}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Start training", priority=True),
        Binding("ctrl+l", "toggle_view", "Form / live view", priority=True),
        Binding("c", "cancel", "Cancel job"),
        Binding("u", "resume", "Resume job"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.choices = TrainChoices()
        self.checked = trainform.Checked()
        self.progress: TrainProgress | None = None
        self.tail: EventTail | None = None

    # -- layout ------------------------------------------------------------------------------
    def compose_body(self) -> ComposeResult:
        with ContentSwitcher(initial="form", id="views"):
            with VerticalScroll(id="form"):
                yield from self._compose_choices()
                with Grid(id="params"):
                    for key in FORM_KEYS:
                        yield FieldLabel(key, f"f-{key}")
                        yield Input(compact=True, id=f"f-{key}")
                with Horizontal(id="more"):
                    yield FieldLabel("more", "extras")
                    yield Input(placeholder="key=value; key=value (any recipe key)", compact=True,
                                id="extras")
                yield Static("", id="problems")
                yield Static("", id="following")
                yield Static("", id="plan")
                yield Button("Start training (ctrl+s)", variant="primary", compact=True, id="start")
            with Vertical(id="live"):
                yield Static("no training job followed", id="live-head")
                yield LineChart(SERIES, empty="waiting for the first step…", id="chart")
                yield Static("", id="live-foot")

    def _compose_choices(self) -> ComposeResult:
        with Grid(id="choices"):
            yield FieldLabel("model", "model")
            yield Select([], prompt="model", compact=True, id="model")
            yield FieldLabel("dataset", "dataset")
            yield Select([], prompt="dataset", compact=True, id="dataset")
            yield FieldLabel("recipe", "recipe")
            yield Select([], prompt="recipe", compact=True, id="recipe")
            yield FieldLabel("plan for", "target")
            yield Select([("this machine", HERE)], allow_blank=False, compact=True, id="target")
            yield FieldLabel("run name", "name")
            yield Input(placeholder="model-dataset", compact=True, id="name")
            yield FieldLabel("", "force")
            yield TickBox("start anyway", compact=True, id="force")

    def on_mount(self) -> None:
        self.query_one("#chart", LineChart).border_title = "[cyan]loss[/] · [yellow]eval loss[/]"

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        super().on_descendant_focus(event)
        self._mark_focused(event.widget.id)

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        super().on_descendant_blur(event)
        self._mark_focused(None)

    def _mark_focused(self, widget_id: str | None) -> None:
        """`▸` before the label of the focused field (visible without colour)."""
        for label in self.query(FieldLabel):
            label.mark(label.target == widget_id)

    # -- data --------------------------------------------------------------------------------
    def reload(self) -> None:
        ws, probe = self.ws, self.appliance.settings.probe
        self.background(lambda: trainform.load_choices(ws, probe(ws).gpus), self._apply_choices,
                        group="choices")
        if self.appliance.pending_training:
            self.follow(self.appliance.pending_training, show=True)
            self.appliance.pending_training = None
        elif self.tail is None:
            self.background(lambda: newest_active_training(ws), self._attach_to, group="attach")

    def _attach_to(self, job_id: str | None) -> None:
        if job_id and self.tail is None:
            self.follow(job_id, show=False)

    def _apply_choices(self, choices: TrainChoices) -> None:
        self.choices = choices
        _set_options(self.query_one("#model", Select), [m.name for m in choices.models])
        _set_options(self.query_one("#recipe", Select), list(choices.recipes),
                     default=DEFAULT_RECIPE)
        gpu = f"this machine ({choices.gpus[0].name})" if choices.gpus else "this machine (CPU)"
        _set_options(self.query_one("#target", Select), [HERE, *planner.TARGETS], labels={HERE: gpu})
        self._datasets_for_model()
        self.revalidate()

    def _datasets_for_model(self) -> None:
        model = _value(self.query_one("#model", Select))
        names = [d for d, m in self.choices.datasets.items() if m == model]
        _set_options(self.query_one("#dataset", Select), names)

    def _fill_from_recipe(self) -> None:
        recipe = _value(self.query_one("#recipe", Select))
        values = self.choices.recipes.get(recipe or "", ({}, ""))[0]
        for key in FORM_KEYS:
            self.query_one(f"#f-{key}", Input).value = trainform.field_text(values[key]) \
                if key in values else ""
            self.query_one(f"#f-{key}", Input).placeholder = "recipe default" if key not in values \
                else ""

    # -- validation as you type --------------------------------------------------------------
    def form(self) -> FormState:
        return FormState(
            model=_value(self.query_one("#model", Select)),
            dataset=_value(self.query_one("#dataset", Select)),
            recipe=_value(self.query_one("#recipe", Select)) or "",
            target=_value(self.query_one("#target", Select)) or HERE,
            name=self.query_one("#name", Input).value,
            fields={k: self.query_one(f"#f-{k}", Input).value for k in FORM_KEYS},
            extras=self.query_one("#extras", Input).value,
            force=self.query_one("#force", Checkbox).value)

    def revalidate(self) -> None:
        form = self.form()
        self.checked = trainform.check(form, self.choices)
        self.query_one("#name", Input).placeholder = self.checked.name or "model-dataset"
        problems = self.checked.problems
        for key in (*FORM_KEYS, "name", "extras"):
            widget = self.query_one(f"#f-{key}" if key in FORM_KEYS else f"#{key}", Input)
            widget.set_class(key in problems, "-invalid")
        lines = [f"[b red]✗[/] {k}: {v}" for k, v in problems.items()]
        ready = f"[b green]✓[/] ready: run [b]{self.checked.name}[/] (ctrl+s starts it)"
        if self.edge_profile:  # the form still shows what a run would be; it cannot start here
            lines, ready = [f"[b yellow]![/] {self.full_profile_note('train')}", *lines], ""
        self.query_one("#problems", Static).update("\n".join(lines) if lines else ready)
        self.query_one("#plan", Static).update(plan_text(self.checked))
        self.query_one("#start", Button).disabled = not self.checked.ok or self.edge_profile

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "model":
            self._datasets_for_model()
        if event.select.id == "recipe":
            self._fill_from_recipe()
        self.revalidate()

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def _changed(self) -> None:
        self.revalidate()

    # -- start, follow, cancel, resume ---------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        views = self.query("#views")
        live = bool(views) and views.first(ContentSwitcher).current == "live"
        if action in ("cancel", "resume"):
            if not live or self.tail is None:
                return False
            state = self.progress.state if self.progress else ""
            can = state in ("queued", "running") if action == "cancel" else state in jobs.RESUMABLE
            return True if can else None  # None: shown greyed out
        if action == "start" and live:
            return False
        return super().check_action(action, parameters)

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        self.revalidate()
        form, checked, ws = self.form(), self.checked, self.ws
        self.background(lambda: trainform.start(ws, form, checked), self._started, group="start",
                        title="Could not start training", modal=True)

    def _started(self, job: jobs.Job) -> None:
        self.job_started(job)
        self.follow(job.id, show=True)
        self.reload()

    def follow(self, job_id: str, *, show: bool) -> None:
        if self.tail is None or self.tail.job_id != job_id:
            self.progress = TrainProgress(job_id, now=self.appliance.settings.clock)
            self.tail = EventTail(self.ws, job_id)
            self.query_one("#chart", LineChart).series = {name: [] for name in SERIES}
        if show:
            self._show_view("live")
        self.poll()

    def action_toggle_view(self) -> None:
        views = self.query_one("#views", ContentSwitcher)
        self._show_view("form" if views.current == "live" else "live")

    def _show_view(self, view: str) -> None:
        self.query_one("#views", ContentSwitcher).current = view
        self.refresh_bindings()
        if view == "form":
            self.query_one("#model", Select).focus()
        else:
            self.set_focus(None)

    def poll(self) -> None:
        self.refresh_activity()
        tail, ws = self.tail, self.ws
        if tail is not None:
            start = tail.offset
            self.background(lambda: read_live(ws, tail, start), self._update_live, group="live",
                            skip_if_busy=True)

    def _update_live(self, read: LiveRead) -> None:
        if read.tail is not self.tail or read.tail.offset != read.start or self.progress is None:
            return
        read.tail.offset = read.end
        p = self.progress
        p.add(read.events)
        p.state, p.message = read.job.state, read.job.message
        self.query_one("#live-head", Static).update(live_head(p))
        self.query_one("#following", Static).update(
            f"training job {p.job_id} is {p.state}: ctrl+l shows it"
            if p.state in ("queued", "running") else "")
        self.query_one("#live-foot", Static).update(live_foot(p))
        if read.events:
            chart = self.query_one("#chart", LineChart)
            chart.set_series("loss", p.loss)
            chart.set_series("eval loss", p.eval_loss)
        self.refresh_bindings()

    def _job_action(self, what: str) -> None:
        if self.tail is None:
            return
        job_id, ws = self.tail.job_id, self.ws
        func = jobs.cancel if what == "cancel" else jobs.resume
        self.background(lambda: func(ws, job_id), lambda job: self.notify(
            f"{job.id}: {job.state}" + (" (cancel requested: it saves a checkpoint, then stops)"
                                        if what == "cancel" else ""), title=what.capitalize()),
            group=what, title=f"Could not {what} the job", modal=True)

    def action_cancel(self) -> None:
        from tui.screens.jobs import confirm_cancel

        if self.tail is not None:
            confirm_cancel(self, self.tail.job_id, "train", lambda: self._job_action("cancel"))

    def action_resume(self) -> None:
        self._job_action("resume")


class FieldLabel(Label):
    """A form field's name; `▸ name` while its field has focus."""

    def __init__(self, text: str, target: str) -> None:
        super().__init__(f"  {text}" if text else "", id=f"l-{target}")
        self.text, self.target = text, target

    def mark(self, focused: bool) -> None:
        self.set_class(focused, "-focused")
        self.update(f"{'▸' if focused else ' '} {self.text}" if self.text else
                    ("▸" if focused else ""))


def _value(select: Select[str]) -> str | None:
    return None if select.value is Select.NULL else str(select.value)


def _set_options(select: Select[str], values: list[str], *, default: str | None = None,
                 labels: dict[str, str] | None = None) -> None:
    """New options (unchanged ones are left alone), keeping the current value when still offered."""
    current = _value(select)
    options = [(labels.get(v, v) if labels else v, v) for v in values]
    if options == _OFFERED.get(select):
        return
    _OFFERED[select] = options
    select.set_options(options)
    keep = current if current in values else default if default in values else \
        values[0] if values else None
    if keep is not None:
        select.value = keep
