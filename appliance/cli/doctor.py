"""`appliance doctor [--clean]`: the installation, hardware and offline status; leftover staging."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from appliance.cli.common import confirm
from appliance.errors import ExitCode
from appliance.textout import open_workspace, print_json, say


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance import doctor

    if args.clean:
        return cmd_doctor_clean(args)
    report = doctor.collect(open_workspace(args))
    if args.json:
        print_json(report)
    else:
        doctor.print_report(report, say)
    return ExitCode.OK if not report["missing"] else ExitCode.FAILED


def _tree_size(path: Path) -> int:
    """Bytes under `path` (its files' sizes, links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _staging_leftovers(ws: Any) -> dict[Path, int]:
    """The hidden staging folders in the workspace, with their sizes: what the operator is asked
    about. `doctor.remove_leftovers` decides what is really left over (no live writer holds it)."""
    from appliance.workspace import KIND_DIRS, STAGING_PREFIX

    found = {}
    for sub in KIND_DIRS.values():
        for path in sorted((ws.root / sub).glob(f"{STAGING_PREFIX}*")):
            if path.is_dir() and not path.is_symlink():
                found[path] = _tree_size(path)
    return found


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_doctor_clean(args: argparse.Namespace) -> int:
    """Remove the staging folders that killed imports and exports left behind."""
    from appliance import doctor

    ws = open_workspace(args)
    found = _staging_leftovers(ws)
    for path, size in found.items():
        say(f"leftover {path} ({_mib(size)})")
    if found and not args.yes and not confirm(
            f"remove {len(found)} leftover folder(s), {_mib(sum(found.values()))}?",
            f"refusing to remove {len(found)} leftover folder(s) without --yes"):
        say("kept")
        return ExitCode.FAILED
    removed = doctor.remove_leftovers(ws) if found else []
    freed = sum(found.get(Path(p), 0) for p in removed)
    for path in removed:
        say(f"removed {path}")
    say(f"removed {len(removed)} leftover folder(s), freed {_mib(freed)}" if removed
        else "no leftovers to remove")
    if args.json:
        print_json({"removed": [str(p) for p in removed], "freed_bytes": freed})
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check the installation, hardware and offline status")
    p.add_argument("--json", action="store_true")
    p.add_argument("--clean", action="store_true",
                   help="remove hidden staging folders that killed imports and exports left behind")
    p.add_argument("--yes", action="store_true", help="with --clean: do not ask for confirmation")
    p.set_defaults(func=cmd_doctor)
