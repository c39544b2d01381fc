"""The `appliance` command. No arguments opens the TUI; subcommands do everything else.

The parser is assembled from command groups: each module in `COMMAND_MODULES` has
`register(subparsers)` and its own `cmd_*` handlers (`appliance.cli.models`, `.data`, `.train`,
`.exports`, `.jobs`, `.doctor`, `.toplevel`, with what they share in `.common`; the runtime and
systemd groups live beside the code they drive). This module only builds the parser and runs a
command.

Start-up must stay under a second: these modules import only the standard library and light parts
of the core at module scope; torch/transformers/Textual are imported inside the commands that use
them (argcomplete too, only when the shell asks for completions). The offline guard is installed
before anything else runs.

Scripts are first-class users: every list and every result takes `--json` (one JSON document on
stdout, the human progress on stderr), each kind of failure has its own exit code (`ExitCode` in
appliance/errors.py, documented in the README), and a reader that closes the pipe early (`| head`)
ends the command quietly with 141, as a shell reports a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Callable, Sequence
from typing import Any

from appliance import __version__, offline
from appliance.cli.common import complete, names
from appliance.cli.toplevel import cmd_tui
from appliance.errors import ApplianceError, ExitCode
from appliance.textout import HumanOutput

# The command groups, in the order `appliance --help` lists them. Each module imports only the
# standard library and light parts of the core at module scope and has `register(subparsers)`.
COMMAND_MODULES = (
    "appliance.cli.models",
    "appliance.cli.data",
    "appliance.cli.train",  # train, runs, plan
    "appliance.cli.exports",  # merge, export, verify, exports
    "appliance.cli.eval",  # eval, evals
    "appliance.cli.jobs",
    "appliance.cli.doctor",
    "appliance.cli.kit",  # kit build, kit verify
    "appliance.cli.bundle",  # bundle create, verify, import, list
    "appliance.cli.signing",  # signing-key, trust
    "appliance.cli.audit",  # audit verify, show, export
    "appliance.cli.toplevel",  # demo, tui, completion
    "appliance.runtime.console",  # chat
    "appliance.runtime.commands",  # serve, keys
    "appliance.systemd",
)
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a writer whose reader went away


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Offline LLM adaptation and deployment. Run with no command for the TUI.",
        epilog="Exit codes: 0 ok, 1 a check said no, 2 usage, 3 network blocked, 4 not found, "
               "5 invalid input, 6 parity gate failed, 7 job failed, 8 busy, 9 disk full, "
               "130 interrupted, 141 output pipe closed.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--home", help="workspace directory (default: $APPLIANCE_HOME or "
                                       "~/.local/share/appliance)")
    parser.set_defaults(func=cmd_tui)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    _complete_registered(sub)
    return parser


def _complete_registered(sub: Any) -> None:
    """Export names for the commands other modules register (`chat ARTIFACT`, `serve ARTIFACT...`)."""
    for command in ("chat", "serve"):
        for action in getattr(sub.choices.get(command), "_actions", []):
            if action.dest in ("artifact", "artifacts"):
                complete(action, names("export"))


# -- running a command ---------------------------------------------------------------------------
def _is_closed(stream: Any) -> bool:
    """True when `stream` is a pipe or socket whose reader has gone away (poll reports an error)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # not a real file (a test's capture): not a closed pipe
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _closed_pipe() -> bool:
    """After a BrokenPipeError: if stdout or stderr is a closed pipe, point it at /dev/null (so the
    interpreter's last flush is quiet) and say so; False when the broken pipe was something else."""
    closed = [s for s in (sys.stdout, sys.stderr) if _is_closed(s)]
    if closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in closed:
            os.dup2(devnull, stream.fileno())
        os.close(devnull)
    return bool(closed)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: each `ApplianceError` exits with its class's code, without a
    traceback; `--json` sends the human text to stderr."""
    HumanOutput.to_stderr = bool(getattr(args, "json", False))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except ApplianceError as exc:
        print(f"error: {exc.title}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except ModuleNotFoundError as exc:
        from appliance import profile

        if (exc.name or "").split(".")[0] not in profile.FULL_ONLY:
            raise  # a broken install, not a profile: keep the traceback
        print(f"error: Needs the full profile: this command needs {exc.name}, which the "
              f"{profile.current()} profile does not install; {profile.FULL_HINT}", file=sys.stderr)
        return int(ExitCode.INVALID)
    except offline.NetworkBlockedError as exc:
        print(f"error: {exc.title}: {exc}", file=sys.stderr)
        return int(ExitCode.NETWORK_BLOCKED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    finally:
        HumanOutput.to_stderr = False


def quiet_on_closed_pipe(func: Callable[[], int]) -> int:
    """Run `func`; a reader that closed the pipe early (`appliance ... | head`) ends it quietly with
    141 instead of a BrokenPipeError traceback."""
    try:
        try:
            result = func()
        except SystemExit:
            sys.stdout.flush()  # argparse's --help and usage, written before it exits
            raise
        sys.stdout.flush()  # not in a `finally`: a flush error must not mask a real exception
        return result
    except BrokenPipeError:
        if not _closed_pipe():
            raise  # a pipe to something else broke: a bug, keep the traceback
        return BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    offline.install()

    def run() -> int:
        parser = build_parser()
        if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (`appliance completion`)
            import argcomplete

            argcomplete.autocomplete(parser)  # prints them and exits
        return run_command(parser.parse_args(argv))

    return quiet_on_closed_pipe(run)
