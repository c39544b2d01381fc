"""What the CLI, the demo and the TUI say the same way: job events, dataset reports, counts.

A neutral module (the standard library only at module scope) so that the front ends share these
without importing each other: the CLI was used as a library by the demo, the TUI and the runtime's
commands, which made an import cycle through it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from appliance.workspace import Workspace


class HumanOutput:
    """Where `say` writes: stdout, or stderr while `--json` keeps stdout for the JSON document."""

    to_stderr = False


def open_workspace(args: argparse.Namespace) -> Workspace:
    """The workspace `--home` names (or the default one): the CLI's one way to open it."""
    from appliance.workspace import Workspace

    return Workspace(Path(args.home) if args.home else None)


def say(message: str) -> None:
    print(message, file=sys.stderr if HumanOutput.to_stderr else sys.stdout, flush=True)


def print_json(data: Any) -> None:
    """The one document a `--json` command prints (keys are documented in the README)."""
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str), flush=True)


def human_count(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def print_dataset_report(report: dict[str, Any], limit: int = 20) -> None:
    tokens = report["tokens"]
    say(f"  form {report['form']}: {report['lines']} lines -> {report['kept']} kept "
        f"({report['train']} train / {report['eval']} eval), {report['rejected']} rejected, "
        f"{report['duplicates']} exact duplicates removed")
    if report["kept"] and not report["eval"]:
        say("  warning: no held-out (eval) conversations: training will report no perplexity, and "
            "its exports cannot be parity-checked (the gate scores the eval split). Import more "
            "conversations, or set --eval-fraction")
    if tokens.get("count"):
        say(f"  tokens per conversation: min {tokens['min']}, p50 {tokens['p50']}, "
            f"mean {tokens['mean']}, p95 {tokens['p95']}, max {tokens['max']} "
            f"(total {tokens['total']})")
    for reason, count in sorted(report["rejected_by_reason"].items()):
        say(f"  rejected {reason}: {count}")
    for row in report["rejections"][:limit]:
        say(f"    line {row['line']}: {row['reason']}")
    if len(report["rejections"]) > limit:
        say(f"    ... {len(report['rejections']) - limit} more (appliance data show NAME "
            "--rejections N)")
    for dup in report["duplicate_lines"][:limit]:
        say(f"    line {dup['line']}: duplicate of line {dup['duplicate_of']}")


def format_event(event: dict[str, Any]) -> str:
    from appliance import progress

    kind = event.get("type")
    if progress.is_staged(event):  # merge / export / verify: the stage, and what is counted
        return progress.describe(event)
    if kind == "progress":
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in event.items() if k not in ("ts", "type", "done", "total", "step"))
        return f"step {event['done']}/{event['total']} {extra}".rstrip()
    if kind == "eval":
        return (f"eval at step {event['step']}: loss {event['eval_loss']:.4f}, perplexity "
                f"{event['perplexity']:.3f}{' (best so far)' if event.get('best') else ''}")
    if kind == "state":
        return f"state -> {event['state']}" + (f": {event['message']}" if event.get("message") else "")
    if kind == "log":
        return event["message"]
    if kind == "train-start":
        start = event.get("step") or 0
        return (f"training {event.get('run', '')}: attempt {event.get('attempt', 1)}, "
                + (f"resuming at step {start} of {event.get('max_steps')}" if start
                   else f"{event.get('max_steps')} steps"))
    return json.dumps(event, ensure_ascii=False)


class EventPrinter:
    """Job events as the CLI and the demo print them, one line each, except a counted stage
    ("tokenizing 401 conversations 21/401 conversations"): on a terminal its count updates one line
    in place; piped or logged, only its first and last counts are printed, not a line per update
    (a counted stage reports every 1/20 of its total: 22 lines for a tokenizing pass)."""

    def __init__(self, indent: str = "", stream: TextIO | None = None) -> None:
        self.indent = indent
        self.stream = stream or (sys.stderr if HumanOutput.to_stderr else sys.stdout)
        self.tty = self.stream.isatty()
        self.open = False  # a line is being rewritten in place and has not ended yet

    def __call__(self, event: dict[str, Any]) -> None:
        from appliance import progress

        text = self.indent + format_event(event).replace("\n", "\n" + self.indent)
        share = progress.fraction(event) if progress.is_staged(event) else None
        if share is not None and share < 1 and self.tty:
            width = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line cannot be redrawn
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self.stream.flush()
            self.open = True
            return
        if share is not None and 0 < share < 1:
            return  # piped: the stage's start and end say it all
        if self.open:  # this line takes the place of the one being updated
            self.stream.write("\r\x1b[K")
            self.open = False
        self.stream.write(text + "\n")
        self.stream.flush()
