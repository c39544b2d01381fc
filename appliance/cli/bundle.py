"""`appliance bundle ...`: carry exports across the air gap (appliance/stages/bundle).

`create` and `import` are jobs (progress, cancel; `--detach` leaves them running); `verify` checks
a bundle file in this process and says who signed it and whether this workspace trusts them;
`list` and `show` read the bundles imported here.
"""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli.common import complete, json_flag, names, run_job
from appliance.errors import ExitCode
from appliance.textout import open_workspace, print_json, say


def cmd_bundle_create(args: argparse.Namespace) -> int:
    from appliance.stages.bundle.request import BundleCreateRequest

    request = BundleCreateRequest.make(args.exports, args.output, args.key, args.unsigned, args.name)
    if not args.unsigned:
        from appliance import signing

        signing.own_key(open_workspace(args), args.key)  # no key: say so before a job starts

    def report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
        result = job.result or {}
        say(f"bundle: {result.get('path')} ({(result.get('size') or 0) / 2**20:.1f} MiB); check "
            f"it anywhere: appliance bundle verify {result.get('path')}")
        return {"bundle": result}, ExitCode.OK

    return run_job(args, request.kind, request.to_params(), "bundle", report)


def cmd_bundle_import(args: argparse.Namespace) -> int:
    from appliance.stages.bundle.request import BundleImportRequest

    request = BundleImportRequest.make(args.file, args.allow_unsigned)

    def report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
        result = job.result or {}
        signer = (f"signed by {result.get('trusted_as')} (key {result.get('key_id')})"
                  if result.get("trusted_as") else "UNSIGNED or untrusted, allowed by --allow-unsigned")
        say(f"imported: {', '.join(result.get('imported') or []) or 'nothing new'}; {signer}")
        return {"import": result}, ExitCode.OK

    return run_job(args, request.kind, request.to_params(), "bundle import", report)


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.stages.bundle import reader

    ws = open_workspace(args)
    checked = reader.read(ws, Path(args.file), allow_unsigned=True)
    doc = checked.doc
    trust = (f"signed by key {checked.key_id}, trusted here as {checked.signer.name!r}"
             if checked.signer else f"signed by key {checked.key_id}, NOT trusted here"
             if checked.key_id else "UNSIGNED")
    summary = {"bundle": doc.get("name"), "created": doc.get("created"),
               "creator": doc.get("creator"), "key_id": checked.key_id,
               "trusted_as": checked.signer.name if checked.signer else None,
               "artifacts": doc["artifacts"], "lineage": doc.get("lineage", []),
               "lineage_missing": doc.get("lineage_missing", []),
               "licenses": doc.get("licenses", []), "files": len(checked.files)}
    if args.json:
        print_json(summary)
    else:
        say(f"{args.file}: every file matches ({len(checked.files)} files); {trust}")
        for art in doc["artifacts"]:
            say(f"  {art['kind']} {art['name']}: {art.get('summary', {}).get('type', '')} "
                f"parity {art.get('summary', {}).get('parity', '?')} ({art.get('status')})")
        for item in doc.get("lineage", []):
            say(f"  from {item['kind']} {item['name']} (manifest {item['manifest_sha256'][:12]}…)")
        for lic in doc.get("licenses", []):
            say(f"  licence of {lic.get('kind')} {lic.get('name')}: {lic.get('id') or lic.get('name')}")
    return ExitCode.OK if checked.signer else ExitCode.FAILED


def cmd_bundle_list(args: argparse.Namespace) -> int:
    from appliance.cli.common import list_artifacts

    return list_artifacts(args, "bundle", ["name", "artifacts", "signed_by", "created"],
                          lambda r: {"artifacts": ",".join(r.summary.get("artifacts", [])),
                                     "signed_by": r.summary.get("trusted_as") or "UNSIGNED"})


def register(sub: Any) -> None:
    p = sub.add_parser("bundle", help="signed bundles: carry exports to another box")
    bsub = p.add_subparsers(metavar="ACTION", required=True)
    c = bsub.add_parser("create", help="one signed file holding exports, lineage, BOM, licences")
    complete(c.add_argument("exports", nargs="+", metavar="EXPORT"), names("export"))
    c.add_argument("-o", "--output", help="the bundle file (default: ./EXPORT.bundle)")
    c.add_argument("--key", help="signing key (default: the default key)")
    c.add_argument("--name", help="the bundle's name (default: the first export's)")
    c.add_argument("--unsigned", action="store_true", help="write no signature (import will "
                                                            "need --allow-unsigned)")
    c.add_argument("--detach", action="store_true", help="start the job and return")
    json_flag(c)
    c.set_defaults(func=cmd_bundle_create)
    v = bsub.add_parser("verify", help="check a bundle file: signature, trust, every file")
    v.add_argument("file")
    json_flag(v, "what the bundle holds")
    v.set_defaults(func=cmd_bundle_verify)
    i = bsub.add_parser("import", help="check a bundle and put its exports in this workspace")
    i.add_argument("file")
    i.add_argument("--allow-unsigned", action="store_true",
                   help="accept an unsigned bundle or an untrusted signer (recorded in the audit log)")
    i.add_argument("--detach", action="store_true", help="start the job and return")
    json_flag(i)
    i.set_defaults(func=cmd_bundle_import)
    ls = bsub.add_parser("list", help="bundles imported into this workspace")
    json_flag(ls, "the list")
    ls.set_defaults(func=cmd_bundle_list)
