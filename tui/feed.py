"""Following a job's events without letting a fast job flood the UI.

A job appends JSON lines to `jobs/<id>/events.jsonl` (see `appliance.jobs`); a training step can emit
hundreds a second. The UI never receives them one by one: a screen polls on a timer, a worker reads
only the bytes added since the last poll (`EventTail`, from `appliance.events`), consecutive progress
events collapse into the last one (`collapse`), and the live view folds the batch into a
`TrainProgress` that the chart redraws once per poll. The redraw rate is therefore bounded by the
poll interval, whatever the job emits.

Nothing waits without saying so: a stage without counts (a model loading, a checkpoint being
saved, an export being checked), a job whose last word was a log line, and a training job whose
steps are done but which still evaluates and saves, are each shown with the time they have taken
so far (`saving checkpoint… 0m42s`), measured from the event that began them. A state change (a
resume) starts a new attempt: its predecessor's ETA and stage are dropped. The steps' total is
taken from any event that carries `max_steps` (or `total_steps`), so it shows before step one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Reading the file is the core's (`appliance.events`); these names stay importable from here.
from appliance import progress
from appliance.events import TAIL_BYTES, Event, EventTail, last_events

__all__ = ["TAIL_BYTES", "Event", "EventTail", "TrainProgress", "collapse", "elapsed", "format_eta",
           "last_events", "stage_started", "summary_line"]

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


def stage_key(event: Event) -> tuple[Any, ...]:
    """What makes two staged events the same stage (their counts aside)."""
    return event.get("stage"), event.get("label"), event.get("artifact")


def stage_started(events: list[Event], index: int) -> float | None:
    """When the stage of `events[index]` began: the time of the first of the events before it of
    the same stage with no other progress or state change between (log lines do not count)."""
    key, since = stage_key(events[index]), events[index].get("ts")
    for event in reversed(events[:index]):
        kind = event.get("type")
        if kind == "state" or (kind == "progress" and stage_key(event) != key):
            break
        if kind == "progress":
            since = event.get("ts", since)
    return since if isinstance(since, int | float) else None


def elapsed(since: Any, now: float | None) -> str:
    """` 0m42s` since `since`; empty without a time or a clock."""
    if now is None or not isinstance(since, int | float):
        return ""
    return f" {format_eta(max(0.0, now - since))}"


def _waiting(text: str, since: Any, now: float | None) -> str:
    """`text… 0m42s`: something without counts that has been going on for a while."""
    if now is None:
        return text
    return f"{text.rstrip(' .…')}…{elapsed(since, now)}"


def summary_line(events: list[Event], now: float | None = None) -> str:
    """One line for a job: its last progress, else its last log or state message. With `now`
    (the job is running), what has no counts says for how long it has gone on: a stage of
    unknown size, a log line, the wait after the last training step."""
    for i in range(len(events) - 1, -1, -1):
        event = events[i]
        kind = event.get("type")
        if progress.is_staged(event):  # merge / export / verify: the stage and its count
            line = progress.describe(event)[:120]
            return line if progress.fraction(event) is not None \
                else _waiting(line, stage_started(events, i), now)
        if kind == "progress":
            extra = f" loss {event['loss']:.4f}" if isinstance(event.get("loss"), float) else ""
            line = f"{_num(event.get('done'))}/{_num(event.get('total'))}{extra}"
            if now is not None and _finished_steps(event):
                line += " · " + _waiting("finishing", event.get("ts"), now)
            return line
        if kind == "log":
            message = str(event.get("message", "")).splitlines()[0][:120] if event.get("message") \
                else ""
            return _waiting(message, event.get("ts"), now) if message else ""
        if kind == "state" and (event.get("message") or now is not None):
            state = event.get("state")
            text = str(event.get("message") or ("starting" if state == "running" else state))
            return _waiting(text[:120], event.get("ts"), now)
    return ""


def _finished_steps(event: Event) -> bool:
    done, total = event.get("done"), event.get("total")
    return isinstance(done, int | float) and isinstance(total, int | float) and 0 < total <= done


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "?"


def _total_steps(event: Event) -> int | None:
    for key in ("total_steps", "max_steps"):
        if isinstance(event.get(key), int) and not isinstance(event.get(key), bool):
            return int(event[key])
    return None


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
    stage: Event | None = None          # a stage after or between steps (load, eval, save, ...)
    stage_since: float | None = None    # when that stage began
    last_step_at: float | None = None   # when the last training step was reported
    attempt_at: float | None = None     # when the current attempt began (its state change)
    now: Callable[[], float] = field(default=time.time, repr=False, compare=False)

    def add(self, events: list[Event]) -> bool:
        """Fold a batch in; True if anything the view shows changed."""
        for event in events:
            self.events += 1
            if (total := _total_steps(event)) is not None:
                self.total = total
            getattr(self, f"_on_{str(event.get('type', '')).replace('-', '_')}", self._on_other)(event)
        if len(self.loss) > MAX_POINTS:
            self.loss = self.loss[::2]
        return bool(events)

    def _on_progress(self, e: Event) -> None:
        if progress.is_staged(e) and "step" not in e and "loss" not in e:
            if self.stage is None or stage_key(self.stage) != stage_key(e):
                self.stage_since = e.get("ts")
            self.stage = e
            return
        self.stage = None
        self.step, self.total = int(e.get("done", self.step)), int(e.get("total", self.total))
        if isinstance(e.get("loss"), int | float):
            self.loss.append((float(e.get("step", self.step)), float(e["loss"])))
        self.lr = e.get("lr", self.lr)
        self.tokens_per_s = e.get("tokens_per_s", self.tokens_per_s)
        self.eta_s = e.get("eta_s", self.eta_s)
        self.gpu_mem_gib = e.get("gpu_mem_gib", self.gpu_mem_gib)
        self.last_step_at = e.get("ts")

    def _on_eval(self, e: Event) -> None:
        if isinstance(e.get("eval_loss"), int | float):
            self.eval_loss.append((float(e.get("step", self.step)), float(e["eval_loss"])))

    def _on_state(self, e: Event) -> None:
        self.state = str(e.get("state", self.state))
        self.message = str(e.get("message", ""))
        if self.state in ("queued", "running"):  # a new attempt: the old one's ETA is not its
            self.eta_s, self.stage, self.last_step_at = None, None, None
            self.attempt_at = e.get("ts")

    def _on_log(self, e: Event) -> None:
        self.last_log = str(e.get("message", "")).splitlines()[0] if e.get("message") else ""

    def _on_other(self, e: Event) -> None:
        pass

    def doing(self) -> str:
        """What a running job does besides counting steps (empty while it counts them): a stage
        with its counts, or its name and how long it has taken; `finishing…` once the steps are
        done; `starting…` before the first step of an attempt."""
        now = self.now()
        if self.stage is not None:
            if progress.fraction(self.stage) is not None:
                return progress.describe(self.stage)
            return _waiting(progress.describe(self.stage), self.stage_since, now)
        if self.total and self.step >= self.total:
            return _waiting("finishing (final evaluation and save)", self.last_step_at, now)
        if self.last_step_at is None:
            return _waiting("starting", self.attempt_at, now)
        return ""


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
