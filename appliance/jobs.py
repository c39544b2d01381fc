"""Jobs: long operations that run in their own detached process and survive the CLI/TUI exiting.

A job is a row in the workspace's SQLite database with a state machine

    queued -> running -> succeeded | failed | cancelled
                     \\-> interrupted  (its process died: kill -9, OOM killer, reboot)

and a directory `jobs/<id>/` holding `events.jsonl` (one JSON object per line: progress, log
lines, state changes), `output.log` (the process's stdout/stderr) and, while a cancel is asked for,
a `cancel` flag file. `spawn` starts `python -m appliance jobs run ID` in a new session, so closing
the terminal does not stop it; the same command runs under the templated systemd unit.

A process records its pid and its start time (from /proc), so a dead job is recognised even after
a reboot or when the pid was reused, and is shown as interrupted. `resume` queues it again: the job
function sees `ctx.attempt > 1` and continues from its checkpoint (or, for idempotent jobs such as
imports, simply runs again). Cancel is cooperative: the function checks `ctx.check_cancel()`
between steps, saves what it has, and stops; SIGTERM (what systemd sends) asks for the same.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, NotFoundError
from appliance.workspace import Workspace

# Jobs that listen on a socket: never inside the job unit, whose PrivateNetwork=yes would leave
# the server reachable from nowhere (under systemd, appliance-server.service is the server's unit).
LISTENING = ("serve",)
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")
RESUMABLE = ("failed", "cancelled", "interrupted")

JOBS_SQL = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    pid INTEGER,
    pid_start TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}'
);
"""


class JobCancelled(Exception):
    """Raised inside a job function when a cancel was asked for (after it saved its state)."""


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    state: str
    created: str
    started: str | None
    finished: str | None
    pid: int | None
    pid_start: str | None
    attempt: int
    message: str
    result: dict[str, Any]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot) plus the boot id, or None.

    Together they identify a process across pid reuse and reboots.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie has already exited; it only waits to be reaped
        return None
    return f"{boot}:{fields[19]}"  # field 22 of stat: starttime


def is_alive(pid: int | None, start: str | None) -> bool:
    return bool(pid) and start is not None and process_start_time(int(pid)) == start


class JobContext:
    """What a job function gets: its parameters, a way to report, and cancellation."""

    def __init__(self, ws: Workspace, job: Job) -> None:
        self.ws, self.job = ws, job
        self.dir = job_dir(ws, job.id)
        self.attempt = job.attempt

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    def emit(self, type_: str, **fields: Any) -> None:
        append_event(self.dir, {"type": type_, **fields})

    def log(self, message: str) -> None:
        self.emit("log", message=message)

    def progress(self, done: float, total: float, **fields: Any) -> None:
        self.emit("progress", done=done, total=total, **fields)

    def cancel_requested(self) -> bool:
        return (self.dir / "cancel").exists()

    def check_cancel(self) -> None:
        if self.cancel_requested():
            raise JobCancelled()


JobFunction = Callable[[JobContext], dict[str, Any] | None]


# -- storage -----------------------------------------------------------------------------------
def job_dir(ws: Workspace, job_id: str) -> Path:
    return ws.root / "jobs" / job_id


def append_event(directory: Path, event: dict[str, Any]) -> None:
    line = json.dumps({"ts": time.time(), **event}, ensure_ascii=False, default=str)
    with open(directory / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def read_events(ws: Workspace, job_id: str, start: int = 0) -> list[dict[str, Any]]:
    """The job's complete events from the `start`-th on (a line being written waits; see
    `appliance.events` for the rules every reader shares)."""
    from appliance.events import EventTail

    events, _ = EventTail(ws, job_id).read_from(0)
    return events[start:]


def _ensure(ws: Workspace) -> None:
    ws.ensure()
    with ws.connect() as db:
        db.executescript(JOBS_SQL)


def _row(row: tuple) -> Job:
    (id_, kind, params, state, created, started, finished, pid, pid_start, attempt, message,
     result) = row
    return Job(id_, kind, json.loads(params), state, created, started, finished, pid, pid_start,
               attempt, message, json.loads(result))


COLUMNS = "id, kind, params, state, created, started, finished, pid, pid_start, attempt, message, result"


def _update(ws: Workspace, job_id: str, **fields: Any) -> None:
    sets = ", ".join(f"{k}=?" for k in fields)
    values = [json.dumps(v) if k in ("params", "result") else v for k, v in fields.items()]
    with ws.connect() as db:
        db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*values, job_id))


def _transition(ws: Workspace, job_id: str, allowed: tuple[str, ...], state: str,
                extra_where: str = "", extra_args: tuple = (), **fields: Any) -> bool:
    """Change state only if the job is still in one of `allowed` (one guarded UPDATE, so two
    processes never both win); True if this call made the change."""
    sets = ", ".join(f"{k}=?" for k in ("state", *fields))
    marks = ", ".join("?" for _ in allowed)
    with ws.connect() as db:
        changed = db.execute(
            f"UPDATE jobs SET {sets} WHERE id=? AND state IN ({marks}){extra_where}",
            (state, *fields.values(), job_id, *allowed, *extra_args)).rowcount
    if changed:
        event = {"type": "state", "state": state}
        if fields.get("message"):
            event["message"] = fields["message"]
        append_event(job_dir(ws, job_id), event)
    return bool(changed)


def _set_state(ws: Workspace, job_id: str, state: str, **fields: Any) -> None:
    _update(ws, job_id, state=state, **fields)
    d = job_dir(ws, job_id)
    if d.exists():
        append_event(d, {"type": "state", "state": state, **{k: v for k, v in fields.items()
                                                             if k == "message"}})


# -- the API ---------------------------------------------------------------------------------------
def submit(ws: Workspace, kind: str, params: dict[str, Any]) -> Job:
    if kind not in KINDS:
        raise ApplianceError(f"unknown job kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    _ensure(ws)
    job_id = f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{kind}-{secrets.token_hex(3)}"
    job_dir(ws, job_id).mkdir(parents=True)
    with ws.connect() as db:
        db.execute("INSERT INTO jobs (id, kind, params, state, created) VALUES (?, ?, ?, ?, ?)",
                   (job_id, kind, json.dumps(params), "queued", _now()))
    append_event(job_dir(ws, job_id), {"type": "state", "state": "queued", "kind": kind})
    return get(ws, job_id)


def spawn(ws: Workspace, job_id: str) -> int:
    """Start `appliance jobs run ID` detached (new session, no terminal, output to a file).

    The runner's pid is recorded while the job is still queued, so a runner that dies before it
    claims the job is noticed (`refresh`) instead of leaving the job queued forever. With
    APPLIANCE_JOB_LAUNCHER=systemd the runner is the `appliance-job@ID` unit instead (no network at
    all; `appliance systemd install`): systemd starts it, and it records its own pid when it claims
    the job."""
    if os.environ.get("APPLIANCE_JOB_LAUNCHER") == "systemd" and get(ws, job_id).kind not in LISTENING:
        return _spawn_unit(ws, job_id)
    d = job_dir(ws, job_id)
    try:
        with open(d / "output.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "--home", str(ws.root), "jobs", "run", job_id],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True)
    except OSError as exc:
        _transition(ws, job_id, ("queued",), "failed", finished=_now(),
                    message=f"could not start its process: {exc}")
        raise ApplianceError(f"could not start job {job_id}: {exc}", title="Job not started",
                             hint=f"fix the cause, then `appliance jobs resume {job_id}`") from exc
    _update_if_queued(ws, job_id, proc.pid)
    return proc.pid


def _spawn_unit(ws: Workspace, job_id: str) -> int:
    unit = f"appliance-job@{job_id}.service"
    try:
        done = subprocess.run(["systemctl", "start", "--no-block", unit], capture_output=True,
                              text=True, timeout=60)
        problem = done.stderr.strip() if done.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = str(exc)
    if problem:
        _transition(ws, job_id, ("queued",), "failed", finished=_now(),
                    message=f"systemctl could not start {unit}: {problem}")
        raise ApplianceError(f"could not start {unit}: {problem}", title="Job not started",
                             hint="install the units (appliance systemd install), or unset "
                                  f"APPLIANCE_JOB_LAUNCHER; then `appliance jobs resume {job_id}`")
    append_event(job_dir(ws, job_id), {"type": "log", "message": f"started as {unit}"})
    return 0


def _update_if_queued(ws: Workspace, job_id: str, pid: int) -> None:
    with ws.connect() as db:
        db.execute("UPDATE jobs SET pid=?, pid_start=? WHERE id=? AND state='queued'",
                   (pid, process_start_time(pid), job_id))


def refresh(ws: Workspace) -> None:
    """Mark running jobs whose process is gone as interrupted, and queued jobs whose runner died
    before claiming them as failed. Each change is guarded on the pid it judged."""
    with ws.connect() as db:
        rows = db.execute("SELECT id, state, pid, pid_start FROM jobs WHERE state IN "
                          "('running', 'queued') AND pid IS NOT NULL").fetchall()
    for job_id, state, pid, start in rows:
        if is_alive(pid, start):
            continue
        if state == "running":
            _transition(ws, job_id, ("running",), "interrupted", " AND pid=?", (pid,),
                        finished=_now(),
                        message="its process ended without finishing (killed, crashed or "
                                f"rebooted); `appliance jobs resume {job_id}` continues it")
        else:
            _transition(ws, job_id, ("queued",), "failed", " AND pid=?", (pid,), finished=_now(),
                        message="its process exited before starting; see "
                                f"{job_dir(ws, job_id) / 'output.log'}")


def list_jobs(ws: Workspace) -> list[Job]:
    if not (ws.root / "appliance.db").exists():
        return []
    _ensure(ws)
    refresh(ws)
    with ws.connect() as db:
        rows = db.execute(f"SELECT {COLUMNS} FROM jobs ORDER BY created DESC, id DESC").fetchall()
    return [_row(r) for r in rows]


def get(ws: Workspace, job_id: str) -> Job:
    _ensure(ws)
    refresh(ws)
    with ws.connect() as db:
        row = db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no job {job_id!r}", hint="`appliance jobs list` shows the jobs")
    return _row(row)


def cancel(ws: Workspace, job_id: str) -> Job:
    job = get(ws, job_id)
    if job.state == "queued" and _transition(ws, job_id, ("queued",), "cancelled", finished=_now(),
                                             message="cancelled before it started"):
        return get(ws, job_id)
    if job.state in ("queued", "running"):  # running, or it started while we looked
        (job_dir(ws, job_id) / "cancel").touch()
        append_event(job_dir(ws, job_id), {"type": "log", "message": "cancel requested"})
    else:
        raise ApplianceError(f"job {job_id} is {job.state}; only queued or running jobs can be "
                             "cancelled", title="Nothing to cancel")
    return get(ws, job_id)


def resume(ws: Workspace, job_id: str, *, detach: bool = True) -> Job:
    job = get(ws, job_id)
    if job.state not in RESUMABLE:
        raise ApplianceError(f"job {job_id} is {job.state}; only {', '.join(RESUMABLE)} jobs can "
                             "be resumed", title="Cannot resume")
    (job_dir(ws, job_id) / "cancel").unlink(missing_ok=True)
    if not _transition(ws, job_id, RESUMABLE, "queued", pid=None, pid_start=None, message="resumed"):
        raise ApplianceError(f"job {job_id} changed state meanwhile (another resume?)",
                             title="Cannot resume", hint="`appliance jobs show` tells its state")
    if detach:
        spawn(ws, job_id)
    return get(ws, job_id)


def start(ws: Workspace, kind: str, params: dict[str, Any]) -> Job:
    """Submit and spawn detached: the caller can exit, the job goes on."""
    job = submit(ws, kind, params)
    spawn(ws, job.id)
    return job


def run(ws: Workspace, job_id: str) -> Job:
    """Run a queued job in this process (what `appliance jobs run ID` does)."""
    job = get(ws, job_id)
    with ws.connect() as db:  # queued -> running atomically: two runners never share a job
        claimed = db.execute(
            "UPDATE jobs SET state='running', started=?, finished=NULL, pid=?, pid_start=?,"
            " attempt=attempt+1, message='' WHERE id=? AND state='queued'",
            (_now(), os.getpid(), process_start_time(os.getpid()), job_id)).rowcount
    if not claimed:
        raise ApplianceError(f"job {job_id} is {job.state}, not queued", title="Cannot run")
    append_event(job_dir(ws, job_id), {"type": "state", "state": "running"})
    ctx = JobContext(ws, get(ws, job_id))
    previous = signal.signal(signal.SIGTERM, lambda *_: (ctx.dir / "cancel").touch())
    try:
        result = KINDS[job.kind](ctx) or {}
    except JobCancelled:
        _set_state(ws, job_id, "cancelled", finished=_now(), message="cancelled by the operator")
    except ApplianceError as exc:
        _set_state(ws, job_id, "failed", finished=_now(), message=f"{exc.title}: {exc}")
    except Exception as exc:  # a bug: keep the traceback in the events for the report
        ctx.emit("traceback", text=traceback.format_exc())
        _set_state(ws, job_id, "failed", finished=_now(), message=f"{type(exc).__name__}: {exc}")
    else:
        _update(ws, job_id, result=result)
        _set_state(ws, job_id, "succeeded", finished=_now(), message="done")
    finally:
        signal.signal(signal.SIGTERM, previous)
        (ctx.dir / "cancel").unlink(missing_ok=True)
    return get(ws, job_id)


def follow(ws: Workspace, job_id: str, poll: float = 0.5) -> Iterator[dict[str, Any]]:
    """Yield events as they are written, until the job reaches a terminal state."""
    seen = 0
    while True:
        events = read_events(ws, job_id, seen)
        seen += len(events)
        yield from events
        if get(ws, job_id).state in TERMINAL and not read_events(ws, job_id, seen):
            return
        time.sleep(poll)


# -- job kinds ---------------------------------------------------------------------------------
def _import_model(ctx: JobContext) -> dict[str, Any]:
    from appliance import models

    p = ctx.params
    if p.get("default"):
        record = models.import_default(ctx.ws, say=ctx.log)
    else:
        template = Path(p["chat_template"]) if p.get("chat_template") else None
        record = models.import_path(ctx.ws, Path(p["path"]), name=p.get("name"),
                                    chat_template_file=template, say=ctx.log)
    return {"model": record.name, "path": str(record.path)}


def _selftest(ctx: JobContext) -> dict[str, Any]:
    """Counts to `steps`, one step per `interval` seconds, keeping its position in a checkpoint:
    lets an operator (and the tests) check detaching, cancel, kill and resume on this box."""
    steps, interval = int(ctx.params.get("steps", 10)), float(ctx.params.get("interval", 0.5))
    checkpoint = ctx.dir / "checkpoint.json"
    done = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    ctx.log(f"attempt {ctx.attempt}: starting at step {done} of {steps}")
    while done < steps:
        ctx.check_cancel()
        time.sleep(interval)
        done += 1
        tmp = checkpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": done}))
        tmp.replace(checkpoint)
        ctx.progress(done, steps)
    return {"steps": done}


def _train(ctx: JobContext) -> dict[str, Any]:
    from appliance.train import run_training

    return run_training(ctx)


def _merge(ctx: JobContext) -> dict[str, Any]:
    from appliance import exports

    p = ctx.params
    record = exports.merge(ctx.ws, p["run"], dtype=p.get("dtype"), base=p.get("base"),
                           say=ctx.log, check_cancel=ctx.check_cancel, progress=ctx.progress)
    return {"export": record.name, "path": str(record.path)}


def _export(ctx: JobContext) -> dict[str, Any]:
    """params {run, format: gguf|onnx, types: [...], overrides: {threshold key: value}}"""
    from appliance import exports

    p = ctx.params
    func = exports.export_gguf if p["format"] == "gguf" else exports.export_onnx
    try:
        records = func(ctx.ws, p["run"], p["types"], scratch=ctx.dir / "work",
                       overrides=p.get("overrides"), say=ctx.log, check_cancel=ctx.check_cancel,
                       progress=ctx.progress)
    except JobCancelled:
        raise  # resumable: keep the intermediate files
    except BaseException:
        shutil.rmtree(ctx.dir / "work", ignore_errors=True)  # a failure (a full disk...) frees them
        raise
    shutil.rmtree(ctx.dir / "work", ignore_errors=True)  # intermediate F16 GGUF / fp32 ONNX
    return {"exports": {r.name: r.status for r in records}}


def _verify(ctx: JobContext) -> dict[str, Any]:
    from appliance import exports

    report = exports.verify(ctx.ws, ctx.params["export"], overrides=ctx.params.get("overrides"),
                            say=ctx.log, check_cancel=ctx.check_cancel, progress=ctx.progress)
    return {"passed": report["passed"]}


def _serve(ctx: JobContext) -> dict[str, Any]:
    """The API server as a job: runs until cancelled (which is how it is stopped)."""
    from appliance.runtime import service

    return service.run_job(ctx)


KINDS: dict[str, JobFunction] = {"import-model": _import_model, "selftest": _selftest,
                                 "train": _train, "merge": _merge, "export": _export, "verify": _verify,
                                 "serve": _serve}
