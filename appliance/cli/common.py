"""What several command groups share: JSON shapes of artifacts and jobs, tables, `list`, `show`
and `rm`, confirmation, the `--json` flag, name completion, and following a job.

Standard library and light parts of the core only at module scope (start-up must stay under a
second); everything heavier is imported inside the function that uses it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance.errors import ExitCode, UsageError
from appliance.textout import EventPrinter, HumanOutput, open_workspace, print_json, say

Handler = Callable[[argparse.Namespace], int]
JobReport = Callable[[Any, Any], tuple[dict[str, Any], int]]

# What `list --json` (and the results of imports and jobs) give for each artifact, besides name,
# status, created and path: the artifact's summary keys, raw (no "135.0M").
SUMMARY_KEYS = {
    "model": ("architecture", "parameters", "context_length", "dtype"),
    "dataset": ("model", "form", "train", "eval", "rejected", "duplicates"),
    "run": ("model", "dataset", "steps", "perplexity_before", "perplexity_after"),
    "export": ("format", "type", "run", "imatrix", "calibrated", "parity"),
    "bundle": ("bundle", "artifacts", "key_id", "trusted_as", "file"),
    "eval": ("targets", "data", "items"),
}


def print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        say("(none)")
        return
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    say("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        say("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _cell(value: Any) -> str:
    """A table cell: '-' for nothing, yes/no for a flag, the first line of a text with a hint."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return text.splitlines()[0] if text else text


def artifact_json(record: Any) -> dict[str, Any]:
    return {"name": record.name, "status": record.status, "created": record.created,
            "path": str(record.path), **{k: record.summary.get(k) for k in SUMMARY_KEYS[record.kind]}}


def job_json(job: Any) -> dict[str, Any]:
    """A job as `jobs show` prints it."""
    from dataclasses import asdict

    return asdict(job)


def list_artifacts(args: argparse.Namespace, kind: str, columns: Sequence[str],
                   human: Callable[[Any], dict[str, Any]]) -> int:
    records = open_workspace(args).list(kind)
    if args.json:
        print_json([artifact_json(r) for r in records])
    else:
        print_table([{**human(r), "name": r.name, "created": r.created} for r in records], columns)
    return 0


def show_artifact(args: argparse.Namespace, kind: str, render: Callable[[dict[str, Any]], None]) -> int:
    from appliance import manifest

    record = open_workspace(args).get(kind, args.name)
    data = manifest.verify(record.path, full=args.verify)
    if args.json:
        print_json(data)
        return 0
    say(f"{kind} {record.name}  ({record.path})")
    render(data)
    total = sum(f["size"] for f in data["files"].values())
    check = "sha256 verified" if args.verify else "sizes checked; --verify hashes every file"
    say(f"files: {len(data['files'])}, {total / 2**20:.1f} MiB ({check})")
    return 0


def confirm(question: str, refusal: str) -> bool:
    """Ask on the terminal; without one, refuse (a script must say --yes)."""
    if not sys.stdin.isatty():
        raise UsageError(refusal, title="Confirmation needed", hint="pass --yes")
    print(f"{question} [y/N] ", end="", file=sys.stderr if HumanOutput.to_stderr else sys.stdout, flush=True)
    return input().strip().lower() in ("y", "yes")


def cmd_rm(args: argparse.Namespace, kind: str) -> int:
    ws = open_workspace(args)
    ws.get(kind, args.name)
    if not args.yes and not confirm(f"remove {kind} {args.name!r}?",
                                    f"refusing to remove {kind} {args.name!r} without --yes"):
        say("kept")
        return ExitCode.FAILED
    path = ws.remove(kind, args.name)
    say(f"removed {kind} {args.name!r} ({path})")
    return 0


# -- jobs started by a command ---------------------------------------------------------------
def follow(ws: Any, job: Any) -> Any:
    """Print a job's events until it ends (to stderr under --json); the job as it ended."""
    from appliance import jobs

    show = EventPrinter()
    for event in jobs.follow(ws, job.id):
        show(event)
    return jobs.get(ws, job.id)


def run_job(args: argparse.Namespace, kind: str, params: dict[str, Any], what: str,
            report: JobReport) -> int:
    """Start a detached job; follow it unless --detach (closing the terminal does not stop it).
    A job that did not succeed exits 7; `report` judges a succeeded one and adds its results."""
    from appliance import api

    ws = open_workspace(args)
    job = api.start(ws, kind, params)
    say(f"started {what} job {job.id} (it runs on if this command exits)")
    if args.detach:
        say(f"follow it: appliance jobs logs {job.id} --follow")
        if args.json:
            print_json({"job": job_json(job)})
        return 0
    done = follow(ws, job)
    doc: dict[str, Any] = {"job": job_json(done)}
    code: int = ExitCode.JOB_FAILED
    if done.state == "succeeded":
        extra, code = report(ws, done)
        doc.update(extra)
    if args.json:
        print_json(doc)
    return int(code)


# -- completion of names -----------------------------------------------------------------------
def _home(parsed: argparse.Namespace) -> Path:
    from appliance.workspace import default_home

    home = getattr(parsed, "home", None)
    return (Path(home) if home else default_home()).expanduser()


def names(kind: str) -> Callable[..., list[str]]:
    """An argcomplete completer: the names of a kind's artifacts, read from the workspace folders
    (no database, nothing written: it runs on every Tab)."""
    def completer(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        from appliance.workspace import KIND_DIRS

        folder = _home(parsed_args) / KIND_DIRS[kind]
        try:
            return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix)
                          and not p.name.startswith(".") and (p / "manifest.json").is_file())
        except OSError:
            return []

    return completer


def job_ids(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    try:
        return sorted((p.name for p in (_home(parsed_args) / "jobs").iterdir()
                       if p.name.startswith(prefix) and p.is_dir()), reverse=True)
    except OSError:
        return []


def complete(action: argparse.Action, completer: Callable[..., list[str]]) -> argparse.Action:
    action.completer = completer  # type: ignore[attr-defined]  # read by argcomplete
    return action


# -- building parsers --------------------------------------------------------------------------
def json_flag(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as JSON on stdout (progress goes to stderr)")


def add_list(sub: Any, help_text: str, func: Handler) -> None:
    p = sub.add_parser("list", help=help_text)
    json_flag(p, "the list")
    p.set_defaults(func=func)


def add_show(sub: Any, func: Handler, kind: str) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="details, checked against the manifest")
    complete(p.add_argument("name"), names(kind))
    p.add_argument("--verify", action="store_true", help="recompute every file's sha256")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=func)
    return p


def add_rm(sub: Any, kind: str) -> None:
    p = sub.add_parser("rm", help=f"remove a {kind}")
    complete(p.add_argument("name"), names(kind))
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=lambda args: cmd_rm(args, kind))
