"""Following a job's events without letting a fast job flood the UI.

A job appends JSON lines to `jobs/<id>/events.jsonl` (see `appliance.jobs`); a training step can emit
hundreds a second. The UI never receives them one by one: a screen polls on a timer, a worker reads
only the bytes added since the last poll (`EventTail`, from `appliance.events`), consecutive progress
events collapse into the last one (`collapse`), and the live view folds the batch into a
`TrainProgress` that the chart redraws once per poll. The redraw rate is therefore bounded by the
poll interval, whatever the job emits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Reading the file is the core's (`appliance.events`); these names stay importable from here.
from appliance import progress
from appliance.events import TAIL_BYTES, Event, EventTail, last_events

__all__ = ["TAIL_BYTES", "Event", "EventTail", "TrainProgress", "collapse", "format_eta", "last_events",
           "summary_line"]

MAX_POINTS = 20000  # loss points kept per run; beyond that every other one is dropped


def collapse(events: list[Event]) -> list[Event]:
    """Keep the last of each run of consecutive progress events, counting the ones dropped."""
    out: list[Event] = []
    for event in events:
        if event.get("type") == "progress" and out and out[-1].get("type") == "progress":
            dropped = out[-1].get("collapsed", 0) + 1
            out[-1] = {**event, "collapsed": dropped}
        else:
            out.append(event)
    return out


def summary_line(events: list[Event]) -> str:
    """One line for a job: its last progress, else its last log or state message."""
    for event in reversed(events):
        kind = event.get("type")
        if progress.is_staged(event):  # merge / export / verify: the stage and its count
            return progress.describe(event)[:120]
        if kind == "progress":
            extra = f" loss {event['loss']:.4f}" if isinstance(event.get("loss"), float) else ""
            return f"{_num(event.get('done'))}/{_num(event.get('total'))}{extra}"
        if kind == "log":
            return str(event.get("message", "")).splitlines()[0][:120] if event.get("message") else ""
        if kind == "state" and event.get("message"):
            return str(event["message"])[:120]
    return ""


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "?"


@dataclass
class TrainProgress:
    """What the live training view shows, folded from a job's events."""

    job_id: str = ""
    state: str = ""
    message: str = ""
    step: int = 0
    total: int = 0
    loss: list[tuple[float, float]] = field(default_factory=list)       # (step, loss)
    eval_loss: list[tuple[float, float]] = field(default_factory=list)  # (step, eval loss)
    lr: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    gpu_mem_gib: float | None = None
    last_log: str = ""
    events: int = 0

    def add(self, events: list[Event]) -> bool:
        """Fold a batch in; True if anything the view shows changed."""
        for event in events:
            self.events += 1
            getattr(self, f"_on_{str(event.get('type', '')).replace('-', '_')}", self._on_other)(event)
        if len(self.loss) > MAX_POINTS:
            self.loss = self.loss[::2]
        return bool(events)

    def _on_progress(self, e: Event) -> None:
        self.step, self.total = int(e.get("done", self.step)), int(e.get("total", self.total))
        if isinstance(e.get("loss"), int | float):
            self.loss.append((float(e.get("step", self.step)), float(e["loss"])))
        self.lr = e.get("lr", self.lr)
        self.tokens_per_s = e.get("tokens_per_s", self.tokens_per_s)
        self.eta_s = e.get("eta_s", self.eta_s)
        self.gpu_mem_gib = e.get("gpu_mem_gib", self.gpu_mem_gib)

    def _on_eval(self, e: Event) -> None:
        if isinstance(e.get("eval_loss"), int | float):
            self.eval_loss.append((float(e.get("step", self.step)), float(e["eval_loss"])))

    def _on_state(self, e: Event) -> None:
        self.state = str(e.get("state", self.state))
        self.message = str(e.get("message", ""))

    def _on_log(self, e: Event) -> None:
        self.last_log = str(e.get("message", "")).splitlines()[0] if e.get("message") else ""

    def _on_other(self, e: Event) -> None:
        pass


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
