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
imports, simply runs again). A cancel works in every phase (`appliance.cancellation`): code that
runs in steps checks `ctx.check_cancel()` inside `ctx.cooperative()`, saves what it has, and stops;
anywhere else (a model load, a wait on a converter) the job is interrupted where it is. SIGTERM
(what systemd sends) asks for the same. A job whose result is an artifact says which
(`ctx.finishes_with`): from right before that commit a cancel is too late, so a job is never
reported cancelled with its result in place; an import resumed after its model was committed
(killed before it was marked done) is done. Every artifact a job writes names it in its manifest
(`config.job`).

The starter never waits for a job (it goes on when the starter exits), but it reaps the job's
process when that ends, from a thread, so a long-lived starter (the TUI) collects no zombies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from appliance import cancellation, manifest
from appliance.cancellation import JobCancelled  # raised by job functions; importable from here
from appliance.errors import ApplianceError, BusyError, NotFoundError, RefusedError
from appliance.workspace import ArtifactRecord, ArtifactWriter, Workspace, check_name, job_dir

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
    if not pid or start is None:
        return False
    return process_start_time(pid) == start


class JobContext:
    """What a job function gets: its parameters, a way to report, and cancellation. Its `ws`
    writes artifacts that name the job in their manifest (`config.job`), and commits the job's
    result as `finishes_with` says."""

    def __init__(self, ws: Workspace, job: Job) -> None:
        self.ws: Workspace = JobWorkspace(ws.root, self)
        self.job = job
        self.dir = job_dir(ws, job.id)
        self.attempt = job.attempt
        self.result_artifact: tuple[str, str | None] | None = None

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

    def cooperative(self) -> contextlib.AbstractContextManager[None]:
        """A section that checks `check_cancel()` often and stops at a safe point by itself (after
        saving a checkpoint): a cancel does not interrupt it. Anywhere else it does."""
        return cancellation.deferred()

    def finishing(self) -> None:
        """The job commits its result now: a cancel from here on is too late to stop it."""
        cancellation.finishing()

    def finishes_with(self, kind: str, name: str | None = None) -> None:
        """The job's result is the artifact of `kind` (and `name`, if given) it commits last:
        `finishing()` is called right before that commit, so the job is never reported cancelled
        with its result in place (then `jobs resume` would find the artifact already there)."""
        self.result_artifact = (kind, name)

    def made_here(self, kind: str) -> ArtifactRecord | None:
        """The artifact of `kind` whose manifest names this job as its maker, if any: a job
        resumed after its commit (killed before it was marked done) finds its result there."""
        for record in self.ws.list(kind):
            with contextlib.suppress(ApplianceError):
                if manifest.read(record.path).get("config", {}).get("job") == self.job.id:
                    return record
        return None


class _JobWriter(ArtifactWriter):
    """A job's artifact writer (see `JobContext`)."""

    ctx: JobContext

    def commit_manifest(self, data: dict[str, Any]) -> dict[str, Any]:
        config = data.get("config") or {}
        if not self.replace:  # a new artifact: this job made it (a rewrite keeps who made it)
            data = {**data, "config": {**config, "job": config.get("job", self.ctx.job.id)}}
        wanted = self.ctx.result_artifact
        if wanted is not None and wanted[0] == self.kind and wanted[1] in (None, self.name):
            self.ctx.finishing()
        return super().commit_manifest(data)


class JobWorkspace(Workspace):
    """The workspace as a job function sees it (`JobContext.ws`): its writers are the job's."""

    def __init__(self, root: Path, ctx: JobContext) -> None:
        super().__init__(root)
        self.ctx = ctx

    def writer(self, kind: str, name: str, *, replace: bool = False) -> ArtifactWriter:
        writer = _JobWriter(self, kind, check_name(name), replace=replace)
        writer.ctx = self.ctx
        return writer


JobFunction = Callable[[JobContext], dict[str, Any] | None]


# -- storage -----------------------------------------------------------------------------------
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
# What a job's audit line names of its request: its subjects, never data or text (a prompt, a key).
AUDITED_PARAMS = ("model", "dataset", "run", "name", "exports", "artifacts", "path", "format",
                  "types", "recipe")


def submit(ws: Workspace, kind: str, params: dict[str, Any]) -> Job:
    """Queue a job (its kind is checked by the caller's registry: `appliance.api.submit`)."""
    _ensure(ws)
    job_id = f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{kind}-{secrets.token_hex(3)}"
    job_dir(ws, job_id).mkdir(parents=True)
    with ws.connect() as db:
        db.execute("INSERT INTO jobs (id, kind, params, state, created) VALUES (?, ?, ?, ?, ?)",
                   (job_id, kind, json.dumps(params), "queued", _now()))
    append_event(job_dir(ws, job_id), {"type": "state", "state": "queued", "kind": kind})
    ws.audit("job-submit", job=job_id, job_kind=kind,
             **{k: params[k] for k in AUDITED_PARAMS if params.get(k) not in (None, "", [])})
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
    reap_when_done(proc)
    return proc.pid


def reap_when_done(proc: subprocess.Popen[bytes]) -> None:
    """Collect a detached child's exit status when it ends, without making the caller wait: a
    long-lived starter would otherwise keep every finished job as a zombie. A daemon thread, so
    the starter can still exit at any time (the job, in its own session, goes on)."""
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()


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
        ws.audit("job-cancel", job=job_id, job_kind=job.kind)
        return get(ws, job_id)
    hint = f"`appliance jobs resume {job_id}` continues it" if job.state in RESUMABLE else \
        "nothing runs for it any more"
    raise RefusedError(f"job {job_id} has already ended: {job.state}{_when(job)}; there is nothing "
                       "to cancel", title="Nothing to cancel", hint=hint)


def _when(job: Job) -> str:
    detail = f" at {job.finished}" if job.finished else ""
    return detail + (f" ({job.message})" if job.message and job.message != "done" else "")


def resume(ws: Workspace, job_id: str, *, detach: bool = True) -> Job:
    job = get(ws, job_id)
    if job.state in ("queued", "running"):
        where = f" (attempt {job.attempt}, pid {job.pid})" if job.state == "running" and job.pid else ""
        raise BusyError(f"job {job_id} is {job.state}{where}: it cannot be resumed while it is "
                        f"{'waiting to run' if job.state == 'queued' else 'running'}",
                        title="Job is still going", hint=f"follow it (appliance jobs logs {job_id} "
                        f"--follow), or stop it first (appliance jobs cancel {job_id})")
    if job.state not in RESUMABLE:
        raise RefusedError(f"job {job_id} {job.state}{_when(job)}; only a failed, cancelled or "
                           "interrupted job can be resumed", title="Nothing to resume",
                           hint="start a new job to do it again")
    (job_dir(ws, job_id) / "cancel").unlink(missing_ok=True)
    if not _transition(ws, job_id, RESUMABLE, "queued", pid=None, pid_start=None, message="resumed"):
        raise BusyError(f"job {job_id} changed state meanwhile (another resume?)",
                        title="Cannot resume", hint="`appliance jobs show` tells its state")
    ws.audit("job-resume", job=job_id, job_kind=job.kind, attempt=job.attempt + 1)
    if detach:
        spawn(ws, job_id)
    return get(ws, job_id)


def start(ws: Workspace, kind: str, params: dict[str, Any]) -> Job:
    """Submit and spawn detached: the caller can exit, the job goes on."""
    job = submit(ws, kind, params)
    spawn(ws, job.id)
    return job


def run(ws: Workspace, job_id: str, kinds: Mapping[str, JobFunction]) -> Job:
    """Run a queued job in this process (what `appliance jobs run ID` does) with the function
    `kinds` names for its kind: the runner knows no stage (`appliance.stages.KINDS` is the table)."""
    job = get(ws, job_id)
    with ws.connect() as db:  # queued -> running atomically: two runners never share a job
        claimed = db.execute(
            "UPDATE jobs SET state='running', started=?, finished=NULL, pid=?, pid_start=?,"
            " attempt=attempt+1, message='' WHERE id=? AND state='queued'",
            (_now(), os.getpid(), process_start_time(os.getpid()), job_id)).rowcount
    if not claimed:
        raise ApplianceError(f"job {job_id} is {job.state}, not queued", title="Cannot run")
    ctx = JobContext(ws, get(ws, job_id))
    append_event(ctx.dir, {"type": "state", "state": "running", "attempt": ctx.attempt})
    flag = ctx.dir / "cancel"
    previous = signal.signal(signal.SIGTERM, _cancel_on_sigterm(flag))
    try:
        with cancellation.armed(flag):
            result = _function(kinds, job)(ctx) or {}
    except JobCancelled as exc:
        log_hidden_error(ctx, exc)
        _set_state(ws, job_id, "cancelled", finished=_now(), message="cancelled by the operator")
    except Exception as exc:
        _failed(ctx, exc)
    else:
        _update(ws, job_id, result=result)
        _set_state(ws, job_id, "succeeded", finished=_now(), message="done")
    finally:
        signal.signal(signal.SIGTERM, previous)
        flag.unlink(missing_ok=True)
    return get(ws, job_id)


def _function(kinds: Mapping[str, JobFunction], job: Job) -> JobFunction:
    if job.kind not in kinds:
        raise ApplianceError(f"job {job.id} is of kind {job.kind!r}, which this version cannot run",
                             title="Unknown job kind", hint=f"known kinds: {', '.join(sorted(kinds))}")
    return kinds[job.kind]


def _cancel_on_sigterm(flag: Path) -> Callable[[int, FrameType | None], None]:
    """SIGTERM (what systemd sends) asks for a cancel. The handler runs inside whatever the job
    was doing: a flag it cannot write (its directory gone, a full disk) must not raise there."""
    def handler(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            flag.touch()
    return handler


def _describe(exc: BaseException) -> str:
    return f"{exc.title}: {exc}" if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"


def log_hidden_error(ctx: JobContext, exc: JobCancelled) -> None:
    """A cancel that landed while the job handled an error (its cleanup, say) hides that error:
    the job ends cancelled, and the error goes to its log, where the operator still sees it."""
    hidden = exc.__context__
    while isinstance(hidden, JobCancelled):
        hidden = hidden.__context__
    if hidden is not None:
        ctx.log(f"the cancel came while the job was handling an error: {_describe(hidden)}")


def _failed(ctx: JobContext, exc: Exception) -> None:
    """A job ended with an error: failed, unless a cancel interrupted it (a converter stopped under
    it, an interrupt wrapped by a library's `except`): then it was cancelled, the error is logged."""
    ws, job_id = ctx.ws, ctx.job.id
    text = _describe(exc)
    if cancellation.interrupted():
        ctx.log(f"stopped by the cancel: {text}")
        _set_state(ws, job_id, "cancelled", finished=_now(), message="cancelled by the operator")
        return
    if not isinstance(exc, ApplianceError):  # a bug: keep the traceback in the events for the report
        ctx.emit("traceback", text=traceback.format_exc())
    _set_state(ws, job_id, "failed", finished=_now(), message=text)


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
