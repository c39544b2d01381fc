"""The API server as a background job, and how others find it and read its metrics.

`appliance serve` runs the server in the foreground (what the systemd unit runs). An operator at
the TUI or a shell wants to start it and walk away: `appliance serve --detach` and the TUI's
Server screen start the same server as a `serve` job. As a job it survives the terminal or UI that
started it, shows in `appliance jobs list`, stops like any job (cancel: the job polls its cancel
flag and shuts the server down cleanly) and starts again with `resume`.

The job announces its address with a `listening` event once its socket is bound (port 0 picks a
free one), so anything that reads the job's events knows where to connect. Live numbers come from
the server's own `/metrics` over the loopback interface, parsed here (`read_metrics`), so the TUI
shows exactly what Prometheus would scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance import jobs
from appliance.errors import ApplianceError, BusyError, RefusedError, ValidationError
from appliance.runtime import DEFAULT_PORT, DEVICES, gpu_wanted, limits
from appliance.workspace import Workspace

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CANCEL_POLL_S = 0.2
MAX_ANSWER = 1 << 20  # bytes read of a /health or /metrics answer
# Probes of our own servers never go through an HTTP proxy (urllib honours http_proxy even for
# 127.0.0.1): the answer must come from the server itself, and nothing may leave the machine.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class ServeOptions:
    """What a server is started with (the `serve` command's options; a serve job's params)."""

    artifacts: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int | None = None
    context: int | None = None
    queue: int = 16
    max_tokens: int = 2048
    max_body: int = 1024 * 1024
    allow_failed_parity: bool = False
    header_timeout: float = limits.DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = limits.DEFAULT_IDLE_TIMEOUT
    body_timeout: float = limits.DEFAULT_BODY_TIMEOUT
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = limits.DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    protect_metrics: bool = False
    log_level: str = "info"
    device: str = "auto"  # runtime.DEVICES

    def validated(self) -> ServeOptions:
        if not self.artifacts:
            raise ValidationError("no artifact to serve", hint="name one or more exports")
        for name, low in (("queue", 0), ("max_tokens", 1), ("max_body", 1024), ("port", 0),
                          ("max_connections", 1), ("max_connections_per_client", 0)):
            if getattr(self, name) < low:
                raise ValidationError(f"{name.replace('_', ' ')} is {getattr(self, name)}; it must "
                                      f"be at least {low}", hint=f"--{name.replace('_', '-')} on "
                                      "the command line")
        for name in ("header_timeout", "idle_timeout", "body_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValidationError(f"{name.replace('_', ' ')} is {getattr(self, name)} s; it must "
                                      "be more than 0 and at most 3600",
                                      hint=f"--{name.replace('_', '-')} on the command line")
        if self.device not in DEVICES:
            raise ValidationError(f"device {self.device!r} is not one of {', '.join(DEVICES)}",
                                  hint="--gpu or --cpu (neither: the GPU when the models fit)")
        if self.log_level not in limits.LOG_LEVELS:
            raise ValidationError(f"log level {self.log_level!r} is not one of "
                                  f"{', '.join(limits.LOG_LEVELS)}", hint="--log-level")
        if self.port > 65535:
            raise ValidationError(f"port is {self.port}; ports go up to 65535")
        if not self.host.strip():
            raise ValidationError("the address to listen on is empty", hint="127.0.0.1 keeps it on "
                                  "this machine")
        return replace(self, host=self.host.strip())

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK

    def params(self) -> dict[str, Any]:
        return {**asdict(self), "artifacts": list(self.artifacts)}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ServeOptions:
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "artifacts": tuple(known.get("artifacts", ()))})


def server_config(options: ServeOptions) -> Any:
    """The server's configuration from the serve options."""
    from appliance.runtime.server import ServerConfig

    return ServerConfig(host=options.host, port=options.port, queue=options.queue,
                        max_tokens=options.max_tokens, max_body=options.max_body,
                        header_timeout=options.header_timeout, idle_timeout=options.idle_timeout,
                        body_timeout=options.body_timeout, max_connections=options.max_connections,
                        max_connections_per_client=options.max_connections_per_client,
                        protect_metrics=options.protect_metrics)


def url_for(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on host:port (a wildcard
    address through loopback of its own family: asyncio binds "::" IPv6-only)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- building and running the server ------------------------------------------------------------
def load(ws: Workspace, options: ServeOptions, say: Callable[[str], None],
         check_cancel: Callable[[], None] = lambda: None) -> Any:
    """Resolve and open every artifact and build the `Server` over them (not yet listening);
    `check_cancel` is asked before each model is opened (a stop while loading stops there)."""
    from appliance.runtime import engines

    engines.preload()  # before the server's own C extensions: docs/PITFALLS.md, "GPU runtime"
    from appliance.runtime import keys, server

    artifacts = [engines.resolve(ref, ws, allow_failed_parity=options.allow_failed_parity)
                 for ref in options.artifacts]
    names = [a.name for a in artifacts]
    if len(set(names)) != len(names):
        raise ValidationError(f"the same artifact is named twice: {', '.join(names)}")
    for art in artifacts:
        check_cancel()
        verify_files(art, say)
    places = placement(artifacts, options, say)
    opened, info = {}, {}
    for art in artifacts:
        check_cancel()
        say(f"loading {art.name} ({art.kind}, parity {art.parity}) ...")
        engine = opened[art.name] = engines.open_engine(art, threads=options.threads,
                                                        context_length=options.context,
                                                        gpu=places[art.name])
        info[art.name] = {"format": art.kind, "parity": art.parity,
                          "context_length": engine.context_length,
                          "device": "gpu" if getattr(engine, "gpu", False) else "cpu"}
    return server.Server(opened, keys.KeyChecker(ws), server_config(options), info)


def verify_files(art: Any, say: Callable[[str], None]) -> None:
    """Every file of a workspace export against the sha256 its manifest recorded, before it is
    served: what was gated is what answers (resolving checks sizes only; a flipped byte keeps the
    size). A loose .gguf or ONNX folder has no manifest to check against."""
    from appliance import manifest

    path = Path(art.path)
    folder = path.parent if path.is_file() or path.name == "onnx" else path
    if not (folder / manifest.MANIFEST).is_file():
        return
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    say(f"checking the sha256 of {art.name}'s files ({size / 2**30:.2f} GiB) against its manifest")
    manifest.verify(folder)


def placement(artifacts: list[Any], options: ServeOptions,
              say: Callable[[str], None]) -> dict[str, bool | None]:
    """Each artifact's `gpu` argument: --cpu: none on the GPU; else, where the runtime has a GPU,
    the models in the order named while they fit its free memory (`runtime.fit`); the rest on the
    CPU (auto, said in the log) or a refusal before anything loads (--gpu)."""
    from appliance.runtime import engines, fit

    wanted = gpu_wanted(options.device)
    if wanted is False:
        return {a.name: False for a in artifacts}
    capable = [a for a in artifacts if engines.has_gpu_runtime(a.kind)]
    out: dict[str, bool | None] = {a.name: wanted for a in artifacts}  # the engine says why not
    if not capable:
        return out
    prints = []
    for a in capable:
        try:
            prints.append(fit.footprint(a.kind, Path(a.path), a.name,
                                        options.context or fit.default_context(a.kind, Path(a.path))))
        except ValidationError as exc:  # no shape in its header: the runtime decides when it loads
            say(f"{a.name}: its GPU memory cannot be estimated ({exc.message}); placed without a check")
    placed, lines = fit.report(prints, fit.this_card(None))
    if placed.fits:
        return out
    if wanted:
        raise ValidationError("the models do not fit the GPU's free memory:\n  " + "\n  ".join(lines),
                              title="Does not fit the GPU",
                              hint="serve fewer models, a shorter --context, a smaller quantization, "
                                   "or --cpu")
    for name in placed.on_cpu:
        out[name] = False
        say(f"{name} goes on the CPU: it does not fit the GPU's free memory ({lines[-1]})")
    return out


def address_in_use(host: str, port: int) -> BusyError:
    return BusyError(f"{host}:{port} is already in use (another server, or another program)",
                     title="Address in use", hint="pick another port, or stop what listens "
                     f"there (`ss -ltnp 'sport = :{port}'` names it)")


def cannot_listen(host: str, port: int, reason: str) -> ValidationError:
    return ValidationError(f"cannot listen on {host}:{port}: {reason}", title="Cannot listen",
                           hint="check the address: it must be one of this machine's (127.0.0.1 "
                                "for this machine only)")


def run_job(ctx: jobs.JobContext) -> dict[str, Any]:
    """The `serve` job: serve until cancelled; the cancel stops it (the job ends `cancelled`)."""
    options = ServeOptions.from_params(ctx.params).validated()
    limits.configure_logging(options.log_level)
    srv = load(ctx.ws, options, ctx.log, ctx.check_cancel)
    ctx.check_cancel()
    with ctx.cooperative():  # the server stops itself on a cancel, finishing answers in flight
        asyncio.run(_serve_until_cancelled(srv, ctx))
    raise jobs.JobCancelled()


async def _listen(srv: Any) -> tuple[Any, int]:
    """`server.start`, its socket errors as the errors an operator can act on."""
    from appliance.runtime import server

    try:
        return await server.start(srv)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise address_in_use(srv.config.host, srv.config.port) from None
        raise cannot_listen(srv.config.host, srv.config.port, exc.strerror or str(exc)) from None


def audit_start(srv: Any, port: int) -> None:
    """The audit line of a server that listens: where, and what it serves."""
    if getattr(srv.keys, "ws", None) is None:
        return
    srv.keys.ws.audit("server-start", host=srv.config.host, port=port, models=list(srv.engines),
                      pid=os.getpid())


def audit_stop(srv: Any) -> None:
    """The audit line of a server that stopped: how many requests each API key made (the counts,
    never the text), and how many were refused a key."""
    if getattr(srv.keys, "ws", None) is None:
        return
    with contextlib.suppress(Exception):  # a full disk must not turn a clean stop into a crash
        srv.keys.ws.audit("server-stop", models=list(srv.engines), pid=os.getpid(),
                          key_uses=dict(srv.keys.uses), refused=srv.keys.refused)


def serve_foreground(srv: Any, on_listening: Callable[[int], None] | None = None) -> None:
    """`appliance serve` (and the systemd unit): serve until SIGINT or SIGTERM, then stop cleanly
    (answers in progress get `shutdown_timeout` to finish). `on_listening(port)` runs once the
    address is bound (so nothing says "serving" for a port that another process holds)."""
    import signal

    async def serve() -> None:
        runner, port = await _listen(srv)
        audit_start(srv, port)
        if on_listening is not None:
            on_listening(port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            audit_stop(srv)

    asyncio.run(serve())


async def _serve_until_cancelled(srv: Any, ctx: jobs.JobContext) -> None:
    runner, port = await _listen(srv)
    audit_start(srv, port)
    url = url_for(srv.config.host, port)
    ctx.emit("listening", url=url, host=srv.config.host, port=port, models=list(srv.engines))
    ctx.log(f"listening at {url}/v1, serving {', '.join(srv.engines)}")
    try:
        while not ctx.cancel_requested():
            await asyncio.sleep(CANCEL_POLL_S)
        ctx.log("stopping: finishing or cutting the answers in progress")
    finally:
        await runner.cleanup()
        audit_stop(srv)


def start(ws: Workspace, options: ServeOptions) -> jobs.Job:
    """Check what can be checked at once (artifacts, a second server on the address, a busy
    port), then start the serve job detached."""
    from appliance.runtime import engines

    options = _absolute(options.validated())
    if not options.loopback and os.environ.get("APPLIANCE_JOB_LAUNCHER") == "systemd":
        raise RefusedError(f"a background server on {options.host} would run outside the "
                           "hardened units this machine uses", title="Not here",
                           hint="serve beyond this machine through appliance-server.service "
                           "(appliance systemd install --allow-remote), or listen on 127.0.0.1")
    for ref in options.artifacts:
        engines.resolve(ref, ws, allow_failed_parity=options.allow_failed_parity)
    for other in running(ws):
        if other.options.port == options.port and options.port != 0:
            raise BusyError(f"serve job {other.job.id} already uses port {options.port}",
                            title="Already serving", hint="stop it first, or pick another port")
    if options.port and not port_free(options.host, options.port):
        raise address_in_use(options.host, options.port)
    return jobs.start(ws, "serve", options.params())


def _absolute(options: ServeOptions) -> ServeOptions:
    """Artifact paths made absolute: the job (and a later resume) may run from elsewhere."""
    refs = tuple(str(Path(r).expanduser().resolve()) if Path(r).expanduser().exists() else r
                 for r in options.artifacts)
    return replace(options, artifacts=refs)


def port_free(host: str, port: int) -> bool:
    """Whether host:port can be bound now, bound as the server will (SO_REUSEADDR, and an IPv6
    socket IPv6-only, as asyncio makes it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise cannot_listen(host, port, exc.strerror or str(exc)) from None
    return True


# -- finding servers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeJob:
    """A serve job that is starting or serving; `url` once it listens."""

    job: jobs.Job
    options: ServeOptions
    url: str | None
    last: str  # its last log line (what it is doing while it loads)


def running(ws: Workspace) -> list[ServeJob]:
    """Serve jobs queued or running, newest first."""
    if not ws.exists():
        return []
    return [describe(ws, j) for j in jobs.list_jobs(ws)
            if j.kind == "serve" and j.state in ("queued", "running")]


def describe(ws: Workspace, job: jobs.Job) -> ServeJob:
    url, last = None, ""
    for event in jobs.read_events(ws, job.id):
        if event.get("type") == "listening" and isinstance(event.get("url"), str):
            url = event["url"]
        elif event.get("type") == "state":
            url = None  # a state change ends the listening before it (a resumed job listens afresh)
        elif event.get("type") == "log":
            last = str(event.get("message", ""))
    return ServeJob(job, ServeOptions.from_params(job.params), url, last)


def _get(url: str, key: str | None) -> urllib.request.Request:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return urllib.request.Request(url, headers=headers)


def health(url: str, timeout: float = 1.0, key: str | None = None) -> dict[str, Any] | None:
    """The server's /health answer, or None when nothing answers there (or it wants a key:
    `serve --protect-metrics`)."""
    try:
        with _DIRECT.open(_get(f"{url}/health", key), timeout=timeout) as response:
            data = json.loads(response.read(MAX_ANSWER))
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
        return None  # nothing there, or something that is not our server
    return data if isinstance(data, dict) else None


# -- metrics ----------------------------------------------------------------------------------
@dataclass
class ModelStats:
    requests: int = 0
    errors: int = 0  # 4xx and 5xx answers
    prompt_tokens: int = 0
    completion_tokens: int = 0
    running: int = 0
    queued: int = 0
    disconnects: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    device: str = ""  # "gpu" or "cpu" (appliance_model_info); "" from a server that does not say

    @property
    def mean_latency(self) -> float | None:
        return self.latency_sum / self.latency_count if self.latency_count else None

    @property
    def mean_ttft(self) -> float | None:
        return self.ttft_sum / self.ttft_count if self.ttft_count else None


@dataclass
class MetricsSnapshot:
    models: dict[str, ModelStats] = field(default_factory=dict)
    requests: int = 0  # every HTTP request, models or not
    unauthorized: int = 0  # 401 answers (no model: the key is checked before the body is read)
    rejected: int = 0  # connections and requests refused by the server's limits
    connections: int = 0  # open now


Sample = tuple[str, dict[str, str], float]


def parse_prometheus(text: str) -> list[Sample]:
    """(name, labels, value) for each sample line of the text exposition format."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_sample(line))
        except (ValueError, IndexError):  # not a sample line: skipped, like Prometheus would
            continue
    return samples


def _sample(line: str) -> Sample:
    """`name{labels} value [timestamp]` (label values may hold spaces and braces)."""
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        labels, end = _labels(line[brace + 1:])
        name, tail = line[:brace], line[brace + end + 2:].split()
    else:
        (name, *tail), labels = line.split(), {}
    return name, labels, float(tail[0])


def _labels(text: str) -> tuple[dict[str, str], int]:
    """The labels at the start of `text` (after the `{`) and where their closing `}` is."""
    labels, i = {}, 0
    while text[i] != "}":
        eq = text.index("=", i)
        key, j, value = text[i:eq].strip(" ,"), eq + 2, []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        labels[key] = "".join(value)
        i = j + 1
        while text[i] in ", ":
            i += 1
    return labels, i


def summarize(samples: list[Sample]) -> MetricsSnapshot:
    snap = MetricsSnapshot()
    stats: dict[str, ModelStats] = defaultdict(ModelStats)
    for name, labels, value in samples:
        if value != value or value in (float("inf"), float("-inf")):
            continue  # NaN / infinities: not counts this screen can show
        model, n = labels.get("model", ""), int(value)
        if name == "appliance_requests_total":
            snap.requests += n
            snap.unauthorized += n if labels.get("status") == "401" else 0
            if model:
                stats[model].requests += n
                stats[model].errors += n if labels.get("status", "")[:1] in "45" else 0
        elif name == "appliance_connections_rejected_total":
            snap.rejected += n
        elif name == "appliance_connections_open":
            snap.connections = n
        elif name == "appliance_model_info" and model:
            stats[model].device = labels.get("device", "")
        elif name == "appliance_tokens_total":
            kind = "prompt_tokens" if labels.get("kind") == "prompt" else "completion_tokens"
            setattr(stats[model], kind, getattr(stats[model], kind) + n)
        elif name in _FIELDS and model:
            kind = _FIELDS[name]
            setattr(stats[model], kind, getattr(stats[model], kind) + (value if "sum" in kind else n))
    snap.models = dict(stats)
    return snap


_FIELDS = {"appliance_queue_depth": "queued", "appliance_requests_running": "running",
           "appliance_client_disconnects_total": "disconnects",
           "appliance_request_seconds_sum": "latency_sum", "appliance_request_seconds_count":
           "latency_count", "appliance_time_to_first_token_seconds_sum": "ttft_sum",
           "appliance_time_to_first_token_seconds_count": "ttft_count"}


def read_metrics(url: str, timeout: float = 2.0, key: str | None = None) -> MetricsSnapshot:
    """The server's /metrics, summed up (`key`: for a server started with --protect-metrics)."""
    try:
        with _DIRECT.open(_get(f"{url}/metrics", key), timeout=timeout) as response:
            text = response.read(MAX_ANSWER).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise ApplianceError(f"{url}/metrics wants an API key", title="Metrics protected",
                                 hint="the server runs with --protect-metrics") from None
        raise ApplianceError(f"no metrics from {url}: {exc}", title="Server not answering",
                             hint="it may still be loading its models; see its job's log") from None
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        raise ApplianceError(f"no metrics from {url}: {exc}", title="Server not answering",
                             hint="it may still be loading its models; see its job's log") from None
    return summarize(parse_prometheus(text))
