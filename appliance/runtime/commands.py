"""CLI commands of the runtime's server side: `appliance serve` and `appliance keys`.

Only the standard library at module scope: `appliance --help` must stay fast, and the server's
imports (aiohttp, llama.cpp, onnxruntime) load only when `serve` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance.runtime import DEFAULT_PORT, add_device_arguments, limits


def _workspace(args: argparse.Namespace) -> Any:
    from appliance.textout import open_workspace as workspace  # the one way to open --home

    return workspace(args)


def _options(args: argparse.Namespace) -> Any:
    from appliance.runtime.service import ServeOptions

    return ServeOptions(tuple(args.artifacts), host=args.host, port=args.port, threads=args.threads,
                        context=args.context, queue=args.queue, max_tokens=args.max_tokens,
                        max_body=args.max_body, allow_failed_parity=args.allow_failed_parity,
                        header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                        body_timeout=args.body_timeout, max_connections=args.max_connections,
                        max_connections_per_client=args.max_connections_per_client,
                        protect_metrics=args.protect_metrics, log_level=args.log_level,
                        device=args.device).validated()


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.runtime import keys, service

    options, ws = _options(args), _workspace(args)
    if args.detach:
        return _detach(ws, options, args)
    limits.configure_logging(options.log_level)
    srv = service.load(ws, options, lambda line: print(line, flush=True))
    active = [k for k in keys.list_keys(ws) if k.revoked is None]

    def listening(port: int) -> None:
        print(f"serving {', '.join(srv.engines)} at {service.url_for(args.host, port)}/v1 "
              f"({len(active)} active API key{'s' if len(active) != 1 else ''})", flush=True)
        _warnings(ws, options, args)

    service.serve_foreground(srv, listening)
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
        if not options.protect_metrics:
            print("warning: /health and /metrics answer without a key (model names, request and "
                  "token counts); --protect-metrics puts them behind a key", file=sys.stderr)


def _home_flag(args: argparse.Namespace) -> str:
    return f" --home {args.home}" if args.home else ""


def _key_row(info: Any) -> dict[str, Any]:
    return {"id": info.id, "name": info.name, "created": info.created, "revoked": info.revoked,
            "state": "revoked" if info.revoked else "active"}


def cmd_keys_create(args: argparse.Namespace) -> int:
    from appliance.runtime import keys

    ws = _workspace(args)
    key = keys.create(ws, args.name)
    if args.json:
        key_id = key.split("_")[1]
        info = next(k for k in keys.list_keys(ws) if k.id == key_id)
        print(json.dumps({"id": info.id, "name": info.name, "key": key, "created": info.created},
                         indent=2), flush=True)
    else:
        print(key, flush=True)
    print(f"API key {args.name!r} created. It is shown only now: store it; the workspace keeps only "
          "its hash.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from appliance.runtime import keys

    rows = keys.list_keys(_workspace(args))
    if args.json:
        print(json.dumps([_key_row(k) for k in rows], indent=2), flush=True)
        return 0
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
                   help="export or GGUF model names (appliance exports list, models list), .gguf files "
                        "or ONNX folders")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    p.add_argument("--threads", type=int, help="CPU threads per model (default: half the cores, at most 8)")
    p.add_argument("--context", type=int, help="context length to open models with")
    add_device_arguments(p)
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
    _add_limits(p)
    p.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="create, list and revoke API keys for the server")
    ksub = k.add_subparsers(metavar="ACTION", required=True)
    p = ksub.add_parser("create", help="a new key (printed once; stored hashed)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print id, name, key and created as JSON")
    p.set_defaults(func=cmd_keys_create)
    p = ksub.add_parser("list", help="keys and their state")
    p.add_argument("--json", action="store_true", help="print the keys as a JSON list")
    p.set_defaults(func=cmd_keys_list)
    p = ksub.add_parser("revoke", help="revoke a key by name or id")
    p.add_argument("name")
    p.set_defaults(func=cmd_keys_revoke)


def _add_limits(p: argparse.ArgumentParser) -> None:
    """The connection limits and the logging of `serve` (docs/RUNTIME.md, "Connections")."""
    g = p.add_argument_group("connections and logging")
    g.add_argument("--header-timeout", type=float, default=limits.DEFAULT_HEADER_TIMEOUT, metavar="S",
                   help="seconds for a whole request head, however slowly it comes "
                        f"(default: {limits.DEFAULT_HEADER_TIMEOUT:g})")
    g.add_argument("--idle-timeout", type=float, default=limits.DEFAULT_IDLE_TIMEOUT, metavar="S",
                   help="seconds a connection may wait for its next request "
                        f"(default: {limits.DEFAULT_IDLE_TIMEOUT:g})")
    g.add_argument("--body-timeout", type=float, default=limits.DEFAULT_BODY_TIMEOUT, metavar="S",
                   help=f"seconds for a request body (default: {limits.DEFAULT_BODY_TIMEOUT:g})")
    g.add_argument("--max-connections", type=int, default=limits.DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="open connections in total; a new one closes the longest idle one, else "
                        f"gets 503 (default: {limits.DEFAULT_MAX_CONNECTIONS})")
    g.add_argument("--max-connections-per-client", type=int, metavar="N",
                   default=limits.DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
                   help="open connections per IPv4 address or IPv6 /64, 0 for no cap; at the cap "
                        "the client's longest-waiting connection makes room, 503 only when all are "
                        "busy (a reverse proxy is one client) "
                        f"(default: {limits.DEFAULT_MAX_CONNECTIONS_PER_CLIENT})")
    g.add_argument("--protect-metrics", action="store_true",
                   help="/health and /metrics need an API key too (by default they answer anyone "
                        "who can reach the server)")
    g.add_argument("--log-level", choices=limits.LOG_LEVELS, default="info",
                   help="info writes one access-log line per request (default: info)")
