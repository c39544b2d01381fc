"""CLI commands of the runtime's server side: `appliance serve` and `appliance keys`.

Only the standard library at module scope: `appliance --help` must stay fast, and the server's
imports (aiohttp, llama.cpp, onnxruntime) load only when `serve` runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.runtime import DEFAULT_PORT


def _workspace(args: argparse.Namespace) -> Any:
    from appliance.cli import _workspace as workspace  # the CLI's one way to open --home

    return workspace(args)


def _options(args: argparse.Namespace) -> Any:
    from appliance.runtime.service import ServeOptions

    return ServeOptions(tuple(args.artifacts), host=args.host, port=args.port, threads=args.threads,
                        context=args.context, queue=args.queue, max_tokens=args.max_tokens,
                        max_body=args.max_body, allow_failed_parity=args.allow_failed_parity
                        ).validated()


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.runtime import keys, service

    options, ws = _options(args), _workspace(args)
    if args.detach:
        return _detach(ws, options, args)
    srv = service.load(ws, options, lambda line: print(line, flush=True))
    active = [k for k in keys.list_keys(ws) if k.revoked is None]
    print(f"serving {', '.join(srv.engines)} at {service.url_for(args.host, args.port)}/v1 "
          f"({len(active)} active API key{'s' if len(active) != 1 else ''})", flush=True)
    _warnings(ws, options, args)
    _run(srv)
    return 0


def _detach(ws: Any, options: Any, args: argparse.Namespace) -> int:
    from appliance.runtime import service

    job = service.start(ws, options)
    home = _home_flag(args)
    where = f"{service.url_for(options.host, options.port)}/v1" if options.port else \
        "a free port (its log says which)"
    print(f"serve job {job.id} started; it loads its models, then listens on {where}")
    print(f"  follow: appliance{home} jobs follow {job.id}\n  stop:   appliance{home} jobs cancel "
          f"{job.id}\n  again:  appliance{home} jobs resume {job.id}")
    _warnings(ws, options, args)
    return 0


def _warnings(ws: Any, options: Any, args: argparse.Namespace) -> None:
    from appliance.runtime import keys

    if not any(k.revoked is None for k in keys.list_keys(ws)):
        print("no API key yet: every request will get 401; create one with "
              f"`appliance{_home_flag(args)} keys create NAME`", flush=True)
    if not options.loopback:
        print(f"warning: listening on {options.host}, not only on this machine", file=sys.stderr)


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
    p.add_argument("--detach", action="store_true",
                   help="run as a background job that outlives this shell (stop it with "
                        "`appliance jobs cancel ID`)")
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
