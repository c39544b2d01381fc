"""`appliance signing-key ...` (the keys this workspace signs bundles and audit exports with) and
`appliance trust ...` (the other boxes' public keys whose bundles it accepts)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import json_flag, print_table
from appliance.errors import UsageError
from appliance.textout import open_workspace, print_json, say


def _rows(keys: list[Any], default: str | None = None) -> list[dict[str, Any]]:
    return [{"name": k.name, "key_id": k.key_id, "source": k.source,
             "default": k.name == default} for k in keys]


def cmd_key_create(args: argparse.Namespace) -> int:
    from appliance import signing

    key = signing.create(open_workspace(args), args.name)
    say(f"signing key {key.name} created (id {key.key_id}); give its public key to the boxes that "
        f"import your bundles: appliance signing-key export {key.name} -o {key.name}.pub")
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    from appliance import signing

    ws = open_workspace(args)
    rows = _rows(signing.own_keys(ws), signing.default_name(ws))
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["name", "key_id", "default"])
    return 0


def _passphrase(args: argparse.Namespace) -> bytes:
    if args.passphrase_file:
        return Path(args.passphrase_file).read_bytes().rstrip(b"\r\n")
    if env := os.environ.get("APPLIANCE_KEY_PASSPHRASE"):
        return env.encode()
    if not sys.stdin.isatty():
        raise UsageError("a private key is exported only encrypted: give --passphrase-file FILE "
                         "(or APPLIANCE_KEY_PASSPHRASE)")
    first = getpass.getpass("passphrase for the exported key: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the two passphrases differ")
    return first.encode()


def cmd_key_export(args: argparse.Namespace) -> int:
    from appliance import signing
    from appliance.fsutil import atomic_write_bytes

    ws = open_workspace(args)
    key = signing.own_key(ws, args.name)
    data = signing.export_private(ws, key.name, _passphrase(args)) if args.private else key.pem
    if args.output in (None, "-"):
        sys.stdout.buffer.write(data)
        return 0
    atomic_write_bytes(Path(args.output), data)
    what = "private key (encrypted)" if args.private else "public key"
    say(f"wrote the {what} of {key.name} (id {key.key_id}) to {args.output}")
    return 0


def cmd_trust_add(args: argparse.Namespace) -> int:
    from appliance import signing

    key = signing.trust_add(open_workspace(args), Path(args.public_key), args.name)
    say(f"trusted key {key.name} (id {key.key_id}): bundles it signed now import")
    return 0


def cmd_trust_list(args: argparse.Namespace) -> int:
    from appliance import signing

    rows = _rows(signing.trusted(open_workspace(args)))
    if args.json:
        print_json(rows)
    else:
        print_table(rows, ["name", "key_id", "source"])
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    from appliance import signing

    key = signing.trust_remove(open_workspace(args), args.name)
    say(f"no longer trusted: {key.name} (id {key.key_id})")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("signing-key", help="keys that sign this box's bundles and audit exports")
    ksub = p.add_subparsers(metavar="ACTION", required=True)
    c = ksub.add_parser("create", help="make an Ed25519 key pair (the first becomes the default)")
    c.add_argument("name")
    c.set_defaults(func=cmd_key_create)
    ls = ksub.add_parser("list", help="this workspace's signing keys")
    json_flag(ls, "the keys")
    ls.set_defaults(func=cmd_key_list)
    e = ksub.add_parser("export", help="write a public key (or, encrypted, the private key)")
    e.add_argument("name", nargs="?", help="key name (default: the default key)")
    e.add_argument("-o", "--output", help="file to write (default: stdout)")
    e.add_argument("--private", action="store_true",
                   help="the private key, encrypted under a passphrase (never in the clear)")
    e.add_argument("--passphrase-file", help="read the passphrase from this file")
    e.set_defaults(func=cmd_key_export)

    t = sub.add_parser("trust", help="public keys whose signed bundles this workspace accepts")
    tsub = t.add_subparsers(metavar="ACTION", required=True)
    a = tsub.add_parser("add", help="trust a public key (PEM) under a name")
    a.add_argument("public_key")
    a.add_argument("--name", required=True)
    a.set_defaults(func=cmd_trust_add)
    tl = tsub.add_parser("list", help="trusted keys: this workspace's own and the added ones")
    json_flag(tl, "the keys")
    tl.set_defaults(func=cmd_trust_list)
    r = tsub.add_parser("remove", help="stop trusting a key")
    r.add_argument("name")
    r.set_defaults(func=cmd_trust_remove)
