"""`appliance kit build|verify`: the offline kit an air-gapped box installs from (appliance/kit.py).

`build` runs on a connected machine after `make setup`, from a checkout (it builds the appliance's
own wheel); `verify` runs anywhere, and the kit's own `install.sh` and `make setup KIT=DIR` run the
same check before installing anything."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from appliance.cli.common import json_flag
from appliance.errors import ExitCode, IntegrityError, ValidationError
from appliance.textout import print_json, say


def _kit_error(exc: Any, error: type[Exception]) -> Exception:
    return error(f"{exc.path}: {exc.check}: {exc.message}")


def cmd_kit_build(args: argparse.Namespace) -> int:
    import subprocess

    import appliance
    from appliance import kit, stack

    checkout = Path(appliance.__file__).resolve().parents[1]
    if not (checkout / "pyproject.toml").is_file():
        raise ValidationError("kit build needs the appliance's source checkout (it builds the "
                              "appliance's own wheel); this install came from a wheel",
                              hint="run it in a checkout after `make setup`")
    cache = Path(os.environ.get("APPLIANCE_CACHE") or Path.home() / ".cache" / "appliance")
    try:
        manifest = kit.build(args.dir, profile=args.profile, accelerator=args.accelerator,
                             checkout=checkout, share=stack.share_dir(), cache=cache, say=say)
    except kit.KitError as exc:
        raise _kit_error(exc, ValidationError) from None
    except subprocess.CalledProcessError as exc:
        raise ValidationError(f"kit build: {' '.join(map(str, exc.cmd[:5]))}... failed "
                              f"(exit {exc.returncode})", hint="see pip's message above") from None
    if args.json:
        print_json({k: v for k, v in manifest.items() if k != "files"})
    else:
        say(f"kit built in {args.dir}: {kit.describe(manifest)}")
    return ExitCode.OK


def cmd_kit_verify(args: argparse.Namespace) -> int:
    from appliance import kit

    try:
        manifest = kit.verify(args.dir, profile=args.profile)
    except kit.KitError as exc:
        raise _kit_error(exc, IntegrityError) from None
    if args.json:
        print_json({k: v for k, v in manifest.items() if k != "files"})
    else:
        say(f"kit verified: {kit.describe(manifest)}")
    return ExitCode.OK


def register(sub: Any) -> None:
    from appliance.kit import ACCELERATORS, PROFILES

    group = sub.add_parser("kit", help="build or check an offline kit for air-gapped installs")
    ksub = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ksub.add_parser("build", help="build a kit in DIR (a connected machine, after make setup)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--profile", choices=PROFILES, default="full",
                   help="full: training box; edge: serve and chat only (default: full)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    json_flag(p, "the kit's manifest")
    p.set_defaults(func=cmd_kit_build)
    p = ksub.add_parser("verify", help="check every file of the kit in DIR against its kit.json")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--profile", choices=PROFILES, help="refuse a kit of another profile")
    json_flag(p, "the kit's manifest")
    p.set_defaults(func=cmd_kit_verify)
