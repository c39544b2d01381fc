"""The small top-level commands: `appliance demo`, `appliance tui` (also what `appliance` alone
runs) and `appliance completion SHELL`. The one module of the core that starts the TUI."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.errors import ApplianceError
from appliance.textout import open_workspace, say

SHELLS = ("bash", "zsh", "fish")


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance import demo

    return demo.run(open_workspace(args), say)


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run

    return run(open_workspace(args))


def cmd_completion(args: argparse.Namespace) -> int:
    """Print the shell's completion script (argcomplete: the shell asks `appliance` itself, so
    artifact names come from the workspace)."""
    try:
        import argcomplete
    except ImportError:
        raise ApplianceError("argcomplete is not installed in this environment",
                             title="Missing package", hint="re-run `make setup`") from None
    sys.stdout.write(argcomplete.shellcode(["appliance"], shell=args.shell))
    return 0


def register(sub: Any) -> None:
    sub.add_parser("demo", help="run the pipeline on the embedded default model").set_defaults(
        func=cmd_demo)
    sub.add_parser("tui", help="open the terminal UI (the default)").set_defaults(func=cmd_tui)
    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh, fish)",
                       description="bash: eval \"$(appliance completion bash)\" in ~/.bashrc; "
                                   "zsh: eval \"$(appliance completion zsh)\" in ~/.zshrc after "
                                   "compinit; fish: appliance completion fish > "
                                   "~/.config/fish/completions/appliance.fish")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=cmd_completion)
