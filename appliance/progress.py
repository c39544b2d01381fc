"""Staged progress: what a merge, an export or a verification is doing now, counted honestly.

A job's progress event (`{"type": "progress", "done", "total", ...}`, `JobContext.progress`) was
made for training steps, where one count says it all. An export is a sequence of unlike stages
(merging tensors, a converter that reports no count until it writes, quantizing tensor by tensor,
scoring held-out conversations) inside a sequence of artifacts. `Stages` turns that into progress
events that carry, besides `done`/`total` of the current stage:

    stage            what it does; an export or a verification: check-inputs | merge | check-merge |
                     load-adapter | load-reference | convert | export-onnx | quantize | check |
                     check-files | load-runtime | score | record | reuse | done; a training run
                     (`appliance.stages.train.recipe`, whose events also carry `max_steps`): check-inputs |
                     launch-workers | tokenize | load-model | load-checkpoint | evaluate |
                     save-checkpoint | publish
    label            what an operator reads: "quantizing to Q4_K_M", "scoring q8_0"
    unit             what `done`/`total` count: tensors, conversations, % (of 100), artifacts, or ""
    artifact         the artifact being made or checked
    artifacts_done   how many of the job's artifacts are finished ...
    artifacts_total  ... of how many it was asked for (the merged model it makes first not counted)

`total` 0 means the stage's size is not known (a converter still reading, an ONNX export, a model
load): nothing is made up, the stage is named and no bar is drawn; a viewer shows how long it has
taken instead (every event has its `ts`). A stage lasts until the next progress event. Counted
stages report at most about `BUCKETS` times, so a model of a thousand tensors cannot flood the
event file. Headless: the CLI and the TUI both describe the events with the functions below.

A stage's operations report through one `Reporter` (log lines, progress events, the cancel check):
a job passes its `JobContext`, which has exactly these methods; callers outside a job (tests, the
bench) pass nothing and get `QUIET`, or a `Quiet` subclass that records what they look at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

BUCKETS = 20  # a counted stage emits when it crosses each 1/BUCKETS of its total (and at its ends)
Counter = Callable[[int, int], None]  # (done, total) of the current stage


class Progress(Protocol):
    """Where staged progress goes: `JobContext.progress` has this shape."""

    def __call__(self, done: float, total: float, **fields: Any) -> None: ...


class Reporter(Protocol):
    """Where an operation reports: a log line, a progress event, and a cancel check between units
    of work (which raises to stop it). `appliance.jobs.JobContext` is one as it is."""

    def log(self, message: str) -> None: ...

    def progress(self, done: float, total: float, **fields: Any) -> None: ...

    def check_cancel(self) -> None: ...


class Quiet:
    """A `Reporter` that drops everything and is never cancelled: for callers outside a job.
    Override one method to watch that channel (a test recording progress events)."""

    def log(self, message: str) -> None:
        pass

    def progress(self, done: float, total: float, **fields: Any) -> None:
        pass

    def check_cancel(self) -> None:
        pass


QUIET: Reporter = Quiet()


@dataclass
class Stages:
    """Reports the stages of one operation to `progress` (None: reports nothing)."""

    progress: Progress | None = None
    artifacts_total: int = 0
    artifacts_done: int = 0
    artifact: str = ""

    def emit(self, stage: str, label: str, done: int = 0, total: int = 0, unit: str = "") -> None:
        if self.progress is not None:
            self.progress(done, total, stage=stage, label=label, unit=unit, artifact=self.artifact,
                          artifacts_done=self.artifacts_done, artifacts_total=self.artifacts_total)

    def counter(self, stage: str, label: str, unit: str, total: int = 0) -> Counter:
        """Announce a counted stage (at 0 of `total`, 0 if not known yet) and return what counts it;
        the counter reports the first and last counts and one per 1/BUCKETS crossed between."""
        self.emit(stage, label, 0, total, unit)
        last = [-1]

        def count(done: int, of: int) -> None:
            bucket = done * BUCKETS // of if of > 0 else -1
            if of > 0 and (bucket != last[0] or done >= of):
                last[0] = bucket
                self.emit(stage, label, done, of, unit)

        return count

    def start(self, artifact: str) -> None:
        self.artifact = artifact

    def finished(self, artifact: str) -> None:
        """One of the counted artifacts is done (made, reused or checked)."""
        self.artifacts_done = min(self.artifacts_done + 1, self.artifacts_total)
        self.artifact = artifact

    def reused(self, artifact: str) -> None:
        self.artifact = artifact
        self.emit("reuse", "exists and matches its manifest: reused", 1, 1)

    def done(self) -> None:
        self.emit("done", "done", self.artifacts_done, self.artifacts_total, "artifacts")


# -- describing an event ---------------------------------------------------------------------------
def is_staged(event: dict[str, Any]) -> bool:
    return event.get("type") == "progress" and isinstance(event.get("stage"), str)


def fraction(event: dict[str, Any]) -> float | None:
    """How far the stage is, when its size is known."""
    done, total = event.get("done"), event.get("total")
    if not isinstance(done, int | float) or not isinstance(total, int | float) or total <= 0:
        return None
    return min(max(done / total, 0.0), 1.0)


def counts(event: dict[str, Any]) -> str:
    """`5/16 conversations`, `40%`; empty when the stage's size is not known or it counts nothing
    in particular (a reuse: done at once)."""
    if fraction(event) is None or not event.get("unit"):
        return ""
    if event.get("unit") == "%":
        return f"{_num(event['done'])}%"
    return f"{_num(event['done'])}/{_num(event['total'])} {event['unit']}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def artifacts(event: dict[str, Any]) -> str:
    """`support-run-gguf-q8_0 (1/2 done)`; the count only when the job makes more than one."""
    name, total = str(event.get("artifact") or ""), event.get("artifacts_total") or 0
    if isinstance(total, int) and total > 1:
        return f"{name} ({event.get('artifacts_done', 0)}/{total} done)".lstrip()
    return name


def describe(event: dict[str, Any]) -> str:
    """One line: `support-run-gguf-q8_0 (0/2 done): scoring q8_0 5/16 conversations`."""
    label, what = str(event.get("label") or event.get("stage")), artifacts(event)
    line = f"{label} {counts(event)}".rstrip()
    return f"{what}: {line}" if what and event.get("stage") != "done" else line
