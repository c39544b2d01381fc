"""`appliance audit ...`: check the audit trail (`verify`), read it (`show`), and hand it to an
auditor (`export`: the lines, the chain head and a signature by the appliance's signing key)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli.common import json_flag, print_table
from appliance.errors import ExitCode
from appliance.textout import open_workspace, print_json, say

SHOWN_FINDINGS = 20


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from appliance import audit

    ws = open_workspace(args)
    verdict = audit.verify(ws.root, ws.connect)
    if args.json:
        print_json({"ok": verdict.ok, "lines": verdict.lines, "unkeyed": verdict.unkeyed,
                    "head": verdict.head.__dict__ if verdict.head else None,
                    "findings": [f.__dict__ for f in verdict.findings]})
        return ExitCode.OK if verdict.ok else ExitCode.FAILED
    unkeyed = f" ({verdict.unkeyed} from before keying, chain only)" if verdict.unkeyed else ""
    if verdict.ok:
        lines = f"{verdict.lines} line{'s' if verdict.lines != 1 else ''}"
        say(f"audit log ok: {lines}{unkeyed}, every MAC, number and link checked, "
            "the end matches the workspace's record")
        return ExitCode.OK
    say(f"audit log FAILED: {len(verdict.findings)} finding(s) in {verdict.lines} lines{unkeyed}")
    for finding in verdict.findings[:SHOWN_FINDINGS]:
        say(f"  [{finding.check}] {finding.message}")
    if len(verdict.findings) > SHOWN_FINDINGS:
        say(f"  ... and {len(verdict.findings) - SHOWN_FINDINGS} more (--json lists all)")
    return ExitCode.FAILED


def _subject(entry: dict[str, Any]) -> str:
    skip = {"seq", "ts", "user", "event", "prev"}
    return " ".join(f"{k}={v}" for k, v in entry.items() if k not in skip)[:90]


def cmd_audit_show(args: argparse.Namespace) -> int:
    from appliance import audit

    ws = open_workspace(args)
    found = list(audit.entries(ws.root, since=args.since, user=args.user, action=args.action))
    if args.limit:
        found = found[-args.limit:]
    if args.json:
        print_json(found)
        return 0
    print_table([{"seq": e.get("seq"), "time": e.get("ts", ""), "user": e.get("user", ""),
                  "action": e.get("event", ""), "subject": _subject(e)} for e in found],
                ["seq", "time", "user", "action", "subject"])
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    from appliance import auditexport

    ws = open_workspace(args)
    out = auditexport.export(ws, Path(args.output), key_name=args.key)
    say(f"wrote {out.path}: {out.lines} lines, chain head {out.head[:16]}…, signed by key "
        f"{out.key_id} ({out.signature.name}); check it with `appliance audit check-export "
        f"{out.path} --public-key KEY.pub`")
    return 0


def cmd_audit_check_export(args: argparse.Namespace) -> int:
    from appliance import auditexport

    result = auditexport.check(Path(args.file), Path(args.public_key))
    say(f"{args.file}: signature valid (key {result.key_id}), {result.lines} lines, chain intact "
        f"to head {result.head[:16]}…")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="check, read and export the audit trail")
    asub = p.add_subparsers(metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="find edited, removed, inserted or reordered lines")
    json_flag(v, "the verdict")
    v.set_defaults(func=cmd_audit_verify)
    s = asub.add_parser("show", help="the audit lines, filtered")
    s.add_argument("--since", help="only lines at or after this ISO time (e.g. 2026-12-01)")
    s.add_argument("--user", help="only lines by this OS user")
    s.add_argument("--action", help="only this action (commit, verify, key-create, ...)")
    s.add_argument("--limit", type=int, default=0, help="only the last N lines")
    json_flag(s, "the lines")
    s.set_defaults(func=cmd_audit_show)
    e = asub.add_parser("export", help="the lines and chain head, signed, for an auditor")
    e.add_argument("output", help="file to write (a .sig file is written beside it)")
    e.add_argument("--key", help="signing key name (default: the only or default key)")
    e.set_defaults(func=cmd_audit_export)
    c = asub.add_parser("check-export", help="check an exported trail against a public key")
    c.add_argument("file")
    c.add_argument("--public-key", required=True, help="the signer's public key (PEM)")
    c.set_defaults(func=cmd_audit_check_export)
