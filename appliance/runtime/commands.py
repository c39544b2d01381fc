"""CLI commands of the runtime's server side: `appliance serve` and `appliance keys`.

Only the standard library at module scope: `appliance --help` must stay fast, and the server's
imports (aiohttp, llama.cpp, onnxruntime) load only when `serve` runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

DEFAULT_PORT = 8321


def _workspace(args: argparse.Namespace) -> Any:
    from appliance.cli import _workspace as workspace  # the CLI's one way to open --home

    return workspace(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.errors import ValidationError
    from appliance.runtime import engine as engines
    from appliance.runtime import keys, server

    for name, low in (("queue", 0), ("max_tokens", 1), ("max_body", 1024), ("port", 0)):
        if getattr(args, name) < low:
            raise ValidationError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be "
                                  f"at least {low}")
    ws = _workspace(args)
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    artifacts = [engines.resolve(ref, ws, allow_failed_parity=args.allow_failed_parity)
                 for ref in args.artifacts]
    names = [a.name for a in artifacts]
    if len(set(names)) != len(names):
        raise ValidationError(f"the same artifact is named twice: {', '.join(names)}")
    opened, info = {}, {}
    for art in artifacts:
        print(f"loading {art.name} ({art.kind}, parity {art.parity}) ...", flush=True)
        opened[art.name] = engines.open_engine(art, threads=args.threads, context_length=args.context)
        info[art.name] = {"format": art.kind, "parity": art.parity,
                          "context_length": opened[art.name].context_length}
    config = server.ServerConfig(host=args.host, port=args.port, queue=args.queue,
                                 max_tokens=args.max_tokens, max_body=args.max_body)
    active = [k for k in keys.list_keys(ws) if k.revoked is None]
    srv = server.Server(opened, keys.KeyChecker(ws), config, info)
    print(f"serving {', '.join(names)} at http://{args.host}:{args.port}/v1 "
          f"({len(active)} active API key{'s' if len(active) != 1 else ''})", flush=True)
    if not active:
        print("no API key yet: every request will get 401; create one with "
              f"`appliance{_home_flag(args)} keys create NAME`", flush=True)
    if not loopback:
        print(f"warning: listening on {args.host}, not only on this machine", file=sys.stderr)
    _run(srv)
    return 0


def _run(srv: Any) -> None:
    from aiohttp import web

    config = srv.config
    web.run_app(srv.app(), host=config.host, port=config.port, handler_cancellation=True,
                access_log=None, print=None, shutdown_timeout=5)


def _home_flag(args: argparse.Namespace) -> str:
    return f" --home {args.home}" if args.home else ""


def cmd_keys_create(args: argparse.Namespace) -> int:
    from appliance.runtime import keys

    key = keys.create(_workspace(args), args.name)
    print(key)
    print(f"API key {args.name!r} created. It is shown only now: store it; the workspace keeps only "
          "its hash.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from appliance.runtime import keys

    rows = keys.list_keys(_workspace(args))
    if not rows:
        print("(none)")
    for k in rows:
        state = f"revoked {k.revoked}" if k.revoked else "active"
        print(f"{k.id}  {k.name:24}  created {k.created}  {state}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from appliance.runtime import keys

    info = keys.revoke(_workspace(args), args.name)
    print(f"revoked {info.name} ({info.id}); servers refuse it from their next request")
    return 0


def register(sub: Any) -> None:
    """Add `serve` and `keys` to the `appliance` parser."""
    p = sub.add_parser("serve", help="serve exports through an OpenAI-compatible HTTP API")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                   help="export names (appliance exports list), .gguf files or ONNX folders")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, help="CPU threads per model (default: half the cores, at most 8)")
    p.add_argument("--context", type=int, help="context length to open models with")
    p.add_argument("--queue", type=int, default=16,
                   help="requests that may wait per model before 429 (default: 16)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="the most tokens a request may ask for (default: 2048)")
    p.add_argument("--max-body", type=int, default=1024 * 1024,
                   help="largest request body in bytes (default: 1 MiB)")
    p.add_argument("--allow-failed-parity", action="store_true",
                   help="serve an export whose parity gate failed")
    p.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="create, list and revoke API keys for the server")
    ksub = k.add_subparsers(metavar="ACTION", required=True)
    p = ksub.add_parser("create", help="a new key (printed once; stored hashed)")
    p.add_argument("name")
    p.set_defaults(func=cmd_keys_create)
    ksub.add_parser("list", help="keys and their state").set_defaults(func=cmd_keys_list)
    p = ksub.add_parser("revoke", help="revoke a key by name or id")
    p.add_argument("name")
    p.set_defaults(func=cmd_keys_revoke)
