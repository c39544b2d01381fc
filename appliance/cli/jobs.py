"""`appliance jobs ...`: list, follow, cancel, resume and run background jobs."""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli.common import add_list, complete, job_ids, job_json, print_table
from appliance.errors import ExitCode
from appliance.textout import EventPrinter, open_workspace, print_json, say


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from appliance import jobs

    found = jobs.list_jobs(open_workspace(args))
    if args.json:
        print_json([job_json(j) for j in found])
        return 0
    rows = [{"id": j.id, "kind": j.kind, "state": j.state, "attempt": j.attempt,
             "created": j.created, "message": j.message[:60]} for j in found]
    print_table(rows, ["id", "kind", "state", "attempt", "created", "message"])
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from appliance import jobs

    print_json(job_json(jobs.get(open_workspace(args), args.id)))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from appliance import jobs

    ws = open_workspace(args)
    jobs.get(ws, args.id)
    events = jobs.follow(ws, args.id) if args.follow else iter(jobs.read_events(ws, args.id))
    show = EventPrinter()
    for event in events:
        show(event)
    return 0


def cmd_jobs_action(args: argparse.Namespace, action: str) -> int:
    from appliance import api, jobs

    ws = open_workspace(args)
    if action == "run":
        job = api.run(ws, args.id)
        return ExitCode.OK if job.state == "succeeded" else ExitCode.JOB_FAILED
    job = jobs.cancel(ws, args.id) if action == "cancel" else jobs.resume(ws, args.id)
    say(f"job {job.id}: {job.state}" + (" (cancel requested)" if action == "cancel" else ""))
    return 0


def cmd_jobs_worker(args: argparse.Namespace) -> int:
    from appliance import stages
    from appliance.stages.train.distributed import run_worker

    return run_worker(open_workspace(args), args.id, stages.KINDS["train"])


def cmd_jobs_selftest(args: argparse.Namespace) -> int:
    from appliance import api

    job = api.start(open_workspace(args), "selftest", {"steps": args.steps, "interval": args.interval})
    say(f"started job {job.id}")
    return 0


def register(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="list, follow, cancel and resume background jobs")
    jsub = jobs.add_subparsers(metavar="ACTION", required=True)
    add_list(jsub, "all jobs", cmd_jobs_list)
    for action, text in (("show", "a job's record"), ("logs", "a job's events"),
                         ("cancel", "ask a job to stop (it saves its state first)"),
                         ("resume", "continue an interrupted, failed or cancelled job"),
                         ("run", "run a queued job in this process (used by spawn and systemd)")):
        p = jsub.add_parser(action, help=text)
        complete(p.add_argument("id"), job_ids)
        if action == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        if action == "show":  # it always prints JSON; accepted so scripts can pass --json everywhere
            p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
        funcs = {"show": cmd_jobs_show, "logs": cmd_jobs_logs}
        p.set_defaults(func=funcs.get(action, lambda a, act=action: cmd_jobs_action(a, act)))
    p = jsub.add_parser("worker")  # one rank of a data-parallel job, started by torchrun
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_worker)
    p = jsub.add_parser("selftest", help="a small detached job to check jobs work on this box")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.5)
    p.set_defaults(func=cmd_jobs_selftest)
