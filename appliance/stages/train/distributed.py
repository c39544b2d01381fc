"""Data-parallel training (DDP) across the GPUs of one host, through torch's own launcher.

A `train` job with `devices > 1` stays one job. Its runner (the process `appliance jobs` tracks, so
cancel, kill -9 and resume behave as with one GPU) starts torchrun as a child, and torchrun starts
one worker per device running `appliance jobs worker ID`. The workers use torch.distributed and
`DistributedDataParallel`; nothing here distributes work by hand. Rank 0 writes the events, the
checkpoints and the finished run; every rank sees the same data order and draws its own share of
each step's micro-batches, and the loss is normalised by the step's trained tokens across all ranks,
so N devices at batch b give the same step as one device at batch N x b.

Workers talk over loopback only (gloo and NCCL bound to `lo`): the job unit's PrivateNetwork=yes
holds. Each worker reports its outcome in a JSON file the runner reads, because torchrun's exit
status only says that something failed, not what.

A cancel reaches the workers through the job's cancel flag: in the step loop every rank agrees on it
and rank 0 saves a checkpoint first; in a phase that cannot check (loading the model) a worker is
interrupted (`appliance.cancellation`) and exits non-zero, so torchrun stops the others. The runner
starts torchrun inside its cooperative section, and waits there: from the moment torchrun exists,
a cancel is the workers' to act on, never a reason for the runner's watcher to stop them. It stops
torchrun itself if the workers have not ended `CANCEL_GRACE_S` after the cancel (a worker stuck in
a collective whose peer was interrupted). Rank 0's success stands even if another rank reports a
cancel: the run was published.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from appliance import cancellation
from appliance.errors import ApplianceError
from appliance.jobs import Job, JobCancelled, JobContext, JobFunction
from appliance.workspace import Workspace

WORKER_FLAG = "APPLIANCE_DDP_WORKER"
CANCEL_GRACE_S = 60.0  # after a cancel, how long the workers get to save and stop by themselves
POLL_S = 0.5


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Rank:
    """This process's place in the data-parallel group (one process of one: rank 0 of 1)."""
    if os.environ.get(WORKER_FLAG) != "1":
        return Rank()
    env = os.environ
    return Rank(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))


def in_worker() -> bool:
    return os.environ.get(WORKER_FLAG) == "1"


def all_sum(values: list[float], device: str) -> list[float]:
    """Sum numbers over all ranks (identity on one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class RankContext(JobContext):
    """A worker's view of the job: only rank 0 writes events."""

    def __init__(self, ws: Workspace, job: Job, rank: Rank) -> None:
        super().__init__(ws, job)
        self.rank = rank

    def emit(self, type_: str, **fields: Any) -> None:
        if self.rank.main:
            super().emit(type_, **fields)


# -- the runner side ---------------------------------------------------------------------------
def _check_devices(devices: int) -> None:
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found and found < devices:
        raise ApplianceError(f"devices = {devices}, but this machine has {found} GPU(s)",
                             title="Not enough GPUs", hint=f"set devices to at most {found}")


def _die_with_parent() -> None:
    """In torchrun's process: receive SIGTERM when the runner dies (even kill -9), so that
    torchrun stops the workers instead of leaving them training for a job nobody tracks."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def launch(ctx: JobContext, devices: int) -> dict[str, Any]:
    """Run the job's training on `devices` worker processes and wait for them."""
    _check_devices(devices)
    work = ctx.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("outcome.*.json"):
        old.unlink()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                                          // devices)))}
    cmd = [sys.executable, "-m", "appliance.stages.train.distributed", "--standalone",
           f"--nproc-per-node={devices}", "-m", "appliance", "--home", str(ctx.ws.root),
           "jobs", "worker", ctx.job.id]
    ctx.log(f"starting {devices} data-parallel workers (torchrun; their output: workers.log)")
    with open(ctx.dir / "workers.log", "ab") as log, ctx.cooperative():  # the workers see the flag
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)
        rc, stopped = _wait(ctx, proc)
    if stopped:
        raise JobCancelled()
    return _outcome(ctx, rc)


def _wait(ctx: JobContext, proc: subprocess.Popen[bytes]) -> tuple[int, bool]:
    """torchrun's exit status, and whether it had to be stopped because the workers had not ended
    `CANCEL_GRACE_S` after a cancel."""
    asked: float | None = None
    while True:
        try:
            return proc.wait(timeout=POLL_S), False
        except subprocess.TimeoutExpired:
            pass
        if asked is None and ctx.cancel_requested():
            asked = time.monotonic()
        if asked is not None and time.monotonic() - asked > CANCEL_GRACE_S:
            ctx.log(f"the workers had not stopped {CANCEL_GRACE_S:.0f} s after the cancel: stopping "
                    "them (the last checkpoint is kept)")
            proc.terminate()  # torchrun stops its workers
            try:
                proc.wait(timeout=cancellation.TERM_GRACE_S * 3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return proc.returncode, True


def _outcome(ctx: JobContext, rc: int) -> dict[str, Any]:
    found = {int(p.name.split(".")[1]): json.loads(p.read_text())
             for p in (ctx.dir / "work").glob("outcome.*.json")}
    failed = [o for _, o in sorted(found.items()) if o["state"] == "failed"]
    if failed:
        raise ApplianceError(failed[0]["message"], title=failed[0]["title"], hint=failed[0].get("hint"))
    main = found.get(0, {})
    if main.get("state") == "succeeded":  # published: a cancel another rank saw came too late
        if rc != 0:  # rank 0 finished, so every rank took part in the last step: the run is whole
            ctx.log(f"a worker exited with status {rc} while shutting down after training finished "
                    f"(torch's teardown; see workers.log); the run is complete")
        return main["result"]
    if any(o["state"] == "cancelled" for o in found.values()):
        raise JobCancelled()
    raise ApplianceError(f"the data-parallel workers stopped (torchrun exit status {rc}) without "
                         "saying why", title="Distributed training failed",
                         hint=f"see {ctx.dir / 'workers.log'}; `appliance jobs resume {ctx.job.id}` "
                              "continues from the last checkpoint")


# -- the worker side ---------------------------------------------------------------------------
def run_worker(ws: Workspace, job_id: str, train: JobFunction) -> int:
    """One rank of a data-parallel `train` job (what `appliance jobs worker ID` runs): `train` is
    the train stage's job function (given, so this module never imports the stage)."""
    import torch
    import torch.distributed as dist

    from appliance import jobs

    os.environ[WORKER_FLAG] = "1"
    rank = current()
    ctx = RankContext(ws, jobs.get(ws, job_id), rank)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    outcome = _run_rank(ctx, rank, train)
    if rank.main or outcome["state"] != "succeeded":  # before tearing down, which can hang on a peer
        path = ctx.dir / "work" / f"outcome.{rank.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(outcome))
    dist.destroy_process_group()
    # non-zero makes torchrun stop the other workers: after a failure, or when this one was
    # interrupted by a cancel (its peers may wait for it in a collective)
    return 1 if outcome["state"] == "failed" or outcome.get("interrupted") else 0


def _run_rank(ctx: RankContext, rank: Rank, train: JobFunction) -> dict[str, Any]:
    from appliance import jobs

    try:
        with cancellation.armed(ctx.dir / "cancel"):
            return {"state": "succeeded", "result": train(ctx)}
    except JobCancelled as exc:
        jobs.log_hidden_error(ctx, exc)
        return {"state": "cancelled", "interrupted": cancellation.interrupted()}
    except Exception as exc:
        if cancellation.interrupted():
            return {"state": "cancelled", "interrupted": True}
        if isinstance(exc, ApplianceError):
            return {"state": "failed", "title": exc.title, "message": exc.message, "hint": exc.hint}
        text = traceback.format_exc()  # a bug: keep the traceback
        print(text, file=sys.stderr)
        ctx.emit("traceback", text=text)
        return {"state": "failed", "title": type(exc).__name__, "message": f"rank {rank.rank}: {exc}"}


if __name__ == "__main__":  # torchrun, behind the offline guard
    from appliance import offline

    offline.install()
    from torch.distributed.run import main

    main()
