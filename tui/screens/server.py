"""Server: start and stop the local OpenAI-compatible API server, see where it listens, manage the
API keys it accepts, and watch its requests live.

The server runs as a `serve` job (`appliance.runtime.service`), a process of its own: it goes on
when the UI closes, and `appliance serve --detach` or the Jobs screen see the same one. This
screen only reads and asks: the servers are the running serve jobs (their address comes from the
job's `listening` event), the numbers come from each server's own `/metrics` over loopback on
every poll, and the keys are the workspace's `api_keys` table. A server started elsewhere
(systemd's `appliance-server`) is shown when it answers on the default address.

tok/s is the generation speed the server measured: completion tokens over the time spent
generating them (request time less time to first token). A difference of token counts between two
polls read 0.0 while answers streamed, because a request's tokens are counted when it ends. Below
the table, how many requests the servers refused for a missing or bad key (what /metrics says).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, SelectionList, Static

from appliance import jobs
from appliance.runtime import keys, service
from appliance.workspace import Workspace
from tui.dialogs import ConfirmDialog, FormDialog, NamedSelect, dialog_css, named
from tui.screens.base import ApplianceScreen
from tui.widgets import KeyedTable, TickBox, TickList, clip, first_line, middle, rate

EXTERNAL = "external"  # the servers table's key for a server not started as a job here
MODEL_WIDTH = 24  # the metrics table fits 80 columns; the servers table shows whole names
STATE_WIDTH = 30  # the servers table's state (or what is wrong) fits 80 columns beside its address


@dataclass
class Served:
    """A server the screen shows: a serve job here, or one answering on the default address."""

    key: str
    url: str | None
    state: str
    models: list[str]
    job: jobs.Job | None = None
    last: str = ""
    metrics: service.MetricsSnapshot | None = None
    problem: str = ""


@dataclass
class ServerRead:
    servers: list[Served] = field(default_factory=list)
    keys: list[keys.KeyInfo] = field(default_factory=list)
    at: float = 0.0


def _metrics(served: Served, read: Any) -> None:
    if served.url is None:
        return
    try:
        served.metrics = read(served.url)
    except Exception as exc:  # not answering yet (loading) or gone: said on its row
        served.problem = str(getattr(exc, "message", exc))


def read_server(ws: Workspace, probe_url: str | None, read_metrics: Any) -> ServerRead:
    out = ServerRead(at=time.monotonic())
    if ws.exists():
        out.keys = keys.list_keys(ws)
        for s in service.running(ws):
            state = "serving" if s.url else "starting"
            out.servers.append(Served(s.job.id, s.url, state, list(s.options.artifacts), s.job, s.last))
    mine = {s.url for s in out.servers}
    if probe_url and probe_url not in mine and (health := service.health(probe_url, 0.3)):
        out.servers.append(Served(EXTERNAL, probe_url, "external",
                                  [str(m) for m in health.get("models", [])]))
    for served in out.servers:
        _metrics(served, read_metrics)
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def server_rows(read: ServerRead) -> list[tuple[str, tuple[object, ...]]]:
    """address, state (or what it is doing / what is wrong), models; `l` opens a row's job."""
    rows: list[tuple[str, tuple[object, ...]]] = []
    for s in read.servers:
        where = s.url.removeprefix("http://") if s.url else "-"
        state = f"{s.state}: {s.problem}" if s.problem else \
            f"{s.state}: {s.last}" if s.url is None and s.last else s.state
        rows.append((s.key, (where, clip(first_line(state, 200), STATE_WIDTH), ", ".join(s.models))))
    return rows


def generation_speed(m: service.ModelStats) -> str:
    """Completion tokens per second of generating them (the server's own timings); `-` before
    the first answer."""
    generating = m.latency_sum - m.ttft_sum
    if not m.completion_tokens or m.latency_count == 0 or generating <= 0:
        return "-"
    return rate(m.completion_tokens / generating)


def metric_rows(read: ServerRead) -> list[tuple[str, tuple[object, ...]]]:
    """A row per served model."""
    rows: list[tuple[str, tuple[object, ...]]] = []
    for s in read.servers:
        for name, m in sorted((s.metrics.models if s.metrics else {}).items()):
            rows.append((f"{s.url} {name}", (
                middle(name + (f" ({m.device})" if m.device else ""), MODEL_WIDTH), m.requests,
                m.errors, f"{m.running}/{m.queued}",
                f"{m.prompt_tokens}/{m.completion_tokens}", generation_speed(m),
                _seconds(m.mean_latency), _seconds(m.mean_ttft))))
    return rows


def requests_note(read: ServerRead) -> str:
    """The requests the servers refused for a missing or bad key (which name no model, so the
    table has no row for them), and what tok/s means."""
    snapshots = [s.metrics for s in read.servers if s.metrics is not None]
    if not snapshots:
        return ""
    refused = sum(m.unauthorized for m in snapshots)
    return (f"{refused} request{'s' if refused != 1 else ''} refused for a missing or bad key "
            "(401); tok/s: generation speed")


def key_rows(read: ServerRead) -> list[tuple[str, tuple[object, ...]]]:
    return [(k.id, (k.name, k.id, k.created.replace("T", " ").rstrip("Z"),
                    f"revoked {k.revoked.replace('T', ' ').rstrip('Z')}" if k.revoked else "active"))
            for k in read.keys]


def status_text(read: ServerRead) -> str:
    active = sum(1 for k in read.keys if k.revoked is None)
    keys_note = (f"{active} active API key{'s' if active != 1 else ''}" if active else
                 "[b $warning]no active API key[/]: every request gets 401 until you create one (n)")
    if not read.servers:
        return f"No server running: [b]s[/] starts one. {keys_note}."
    serving = [s for s in read.servers if s.url]
    if not serving:
        return f"Starting: loading the models. {keys_note}."
    where = "" if serving[0].job else " (not started here: systemd's appliance-server?)"
    return f"Clients use [b]{serving[0].url}/v1[/]{where} with a key as Bearer token. {keys_note}."


# `serve`'s --gpu/--cpu: auto places what fits the GPU and leaves the rest on the CPU with a log line
DEVICE_CHOICES = [("GPU if it fits", "auto"), ("GPU only", "gpu"), ("CPU only", "cpu")]


class StartDialog(FormDialog[service.ServeOptions]):
    """Which exports to serve, where, on which device (`serve`'s --gpu/--cpu: "GPU if it fits"
    places the models on the GPU while they fit its free memory and the rest on the CPU with a log
    line; "GPU only" refuses instead; "CPU only" never uses the GPU), and whether a failed-parity
    export may be served."""

    HELP_TITLE = "start the server"
    DEFAULT_CSS = dialog_css("StartDialog") + """
    StartDialog SelectionList { height: auto; max-height: 7; }
    StartDialog .row { height: auto; }
    StartDialog .row Input { width: 1fr; }
    StartDialog .row Select { width: 22; }
    """
    HEADING = "Serve exports through the OpenAI-compatible API"
    SUBMIT = "Start"

    def __init__(self, exports: list[tuple[str, str]]) -> None:
        super().__init__()
        self.exports = exports

    def compose_fields(self) -> ComposeResult:
        yield TickList(*[(label, name, i == 0) for i, (label, name) in enumerate(self.exports)],
                       id="exports")
        with Horizontal(classes="row"):
            yield named(Input("127.0.0.1", id="host"), "listen on address")
            yield named(Input(str(service.DEFAULT_PORT), id="port"), "port")
            yield NamedSelect(DEVICE_CHOICES, value="auto", allow_blank=False, id="device",
                              field_name="run on")
        yield TickBox("allow exports whose parity gate failed", id="allow-failed")
        yield Static("127.0.0.1: this machine only. Another address lets the network in.",
                     classes="muted", id="host-note")

    def submit(self) -> None:
        names = tuple(self.query_one("#exports", SelectionList).selected)
        if not names:
            self.notify("pick at least one export (space ticks one)", severity="warning")
            return
        port = self.query_one("#port", Input).value.strip()
        if not port.isdigit():
            self.notify(f"the port must be a number, not {port!r}", severity="error")
            return
        self.dismiss(service.ServeOptions(
            names, host=self.query_one("#host", Input).value.strip(), port=int(port),
            allow_failed_parity=self.query_one("#allow-failed", Checkbox).value,
            device=str(self.query_one("#device", NamedSelect).value)))

    @on(Input.Changed, "#host")
    def _host(self, event: Input.Changed) -> None:
        local = event.value.strip() in service.LOOPBACK
        self.query_one("#host-note", Static).update(
            "127.0.0.1: this machine only." if local else
            "[b $warning]not loopback[/]: other machines can reach it (a key is still required).")

    @on(Input.Submitted)
    def _entered(self) -> None:
        self.submit()


class KeyDialog(FormDialog[str]):
    HELP_TITLE = "create an API key"
    DEFAULT_CSS = dialog_css("KeyDialog")
    HEADING = "A new API key"
    SUBMIT = "Create"

    def compose_fields(self) -> ComposeResult:
        yield Input(placeholder="name (who or what uses it, e.g. helpdesk-bot)", id="name")

    def submit(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        if name:
            self.dismiss(name)
        else:
            self.notify("give the key a name", severity="warning")

    @on(Input.Submitted)
    def _entered(self) -> None:
        self.submit()


class KeyShown(ModalScreen[None]):
    """The new key, once: the workspace keeps only its hash."""

    HELP_TITLE = "a new API key"
    DEFAULT_CSS = dialog_css("KeyShown") + "KeyShown #key { color: $success; text-style: bold; }"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "close", "Close"),
                                             Binding("c", "copy", "Copy to the clipboard")]

    def __init__(self, name: str, key: str) -> None:
        super().__init__()
        self.name_, self.key = name, key

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("API key created: copy it now, it is not shown again", classes="title")
            yield Static(self.key, id="key", markup=False)
            yield Static(f"Key {self.name_!r}. Clients send it as `Authorization: Bearer KEY`; "
                         "the workspace keeps only its hash.", classes="muted")
            with Horizontal(classes="buttons"):
                yield Button("Copy (c)", id="copy")
                yield Button("Close (esc)", variant="primary", id="close")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.key)  # OSC 52: through the terminal, over SSH too
        self.notify("copied, if your terminal lets programs set the clipboard")

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss(None)


class ServerScreen(ApplianceScreen):
    MODE = "server"
    SUB_TITLE = "Server"
    POLL = True
    FILTER_TABLE = "keys"
    JOB_KINDS = ("serve",)  # a server started here that fails (a port taken, a model that does
    # not load) is announced with its reason; one stopped here is not
    DEFAULT_CSS = """
    ServerScreen #status { height: auto; padding: 0 1; }
    ServerScreen .heading { padding: 0 1; }
    ServerScreen #servers { max-height: 4; }
    ServerScreen #metrics { max-height: 6; }
    ServerScreen #requests { height: auto; padding: 0 1; color: $text-muted; }
    ServerScreen #keys { height: 1fr; max-height: 100%; }
    ServerScreen Vertical { height: auto; }
    ServerScreen #keys-box { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "start", "Start…"),
        Binding("t", "stop", "Stop"),
        Binding("n", "new_key", "New key…"),
        Binding("x,delete", "revoke", "Revoke key"),
        Binding("l", "log", "Log"),
        Binding("slash", "filter", "Filter", show=False),  # the footer has no room left at 80
    ]

    def __init__(self) -> None:
        super().__init__()
        self.last = ServerRead()

    def compose_body(self) -> ComposeResult:
        yield Static("", id="status")
        with Vertical():
            yield Label("Servers", classes="heading")
            yield KeyedTable("address", "state", "models", id="servers")
            yield Label("Requests (run/q: generating/queued; tokens in/out; means in seconds)",
                        classes="heading")
            yield KeyedTable("model", "reqs", "errs", "run/q", "tokens", "tok/s", "lat s",
                             "ttft s", id="metrics")
            yield Static("", id="requests")
        with Vertical(id="keys-box"):
            yield Label("API keys", classes="heading")
            yield KeyedTable("name", "id", "created", "state", id="keys")

    def reload(self) -> None:
        self._read(skip_if_busy=False)
        self.refresh_activity()

    def poll(self) -> None:
        self._read(skip_if_busy=True)
        self.refresh_activity()

    def _read(self, *, skip_if_busy: bool) -> None:
        ws, settings = self.ws, self.appliance.settings
        reader = settings.server_metrics or service.read_metrics
        self.background(lambda: read_server(ws, settings.server_probe, reader), self._show,
                        group="server", skip_if_busy=skip_if_busy)

    def _show(self, read: ServerRead) -> None:
        self.last = read
        self.query_one("#status", Static).update(status_text(read))
        self.query_one("#servers", KeyedTable).fill(server_rows(read))
        self.query_one("#metrics", KeyedTable).fill(metric_rows(read))
        note, text = self.query_one("#requests", Static), requests_note(read)
        note.update(text)
        note.display = bool(text)
        self.query_one("#keys", KeyedTable).fill(key_rows(read))
        self.refresh_bindings()

    # -- the server -----------------------------------------------------------------------------
    def action_start(self) -> None:
        ws = self.ws

        def servable() -> list[tuple[str, str]]:
            records = sorted(ws.list("export"), key=lambda r: (r.status == "failed", r.name)) \
                if ws.exists() else []
            return [(r.name + (" (parity FAIL)" if r.status == "failed" else ""), r.name)
                    for r in records if r.summary.get("format") in ("gguf", "onnx")]

        def ask(exports: list[tuple[str, str]]) -> None:
            if not exports:
                self.app.notify("no GGUF or ONNX export to serve yet: 6 Exports makes one",
                                      title="Nothing to serve", severity="warning")
                return
            self.app.push_screen(StartDialog(exports), self._start)

        self.background(servable, ask, group="exports")

    def _start(self, options: service.ServeOptions | None) -> None:
        if options is None:
            return
        ws = self.ws

        def started(job: jobs.Job) -> None:
            self.job_started(job)
            self.reload()

        self.background(lambda: service.start(ws, options), started, group="start",
                        title="Could not start the server", modal=True)

    def _selected_server(self) -> Served | None:
        found = self.query("#servers")
        key = found.first(KeyedTable).selected_key() if found else None
        return next((s for s in self.last.servers if s.key == key), None)

    def _selected_key(self) -> keys.KeyInfo | None:
        found = self.query("#keys")
        key_id = found.first(KeyedTable).selected_key() if found else None
        return next((k for k in self.last.keys if k.id == key_id), None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Stop, log and revoke grey out when nothing they apply to is selected."""
        if action in ("stop", "log"):  # (stop on a server not started here says where to stop it)
            served = self._selected_server()
            ok = served is not None and (served.job is not None or action == "stop")
            return True if ok else None
        if action == "revoke":
            info = self._selected_key()
            return True if info is not None and not info.revoked else None
        return super().check_action(action, parameters)

    def action_stop(self) -> None:
        served = self._selected_server()
        if served is None:
            self.notify("no server running", severity="warning")
            return
        if served.job is None:
            self.app.notify("this server was not started here: stop it where it was started "
                                  "(under systemd: systemctl stop appliance-server)",
                                  title="Not started here", severity="warning")
            return
        job_id, ws = served.job.id, self.ws

        def answered(yes: bool | None) -> None:
            if yes:
                self.watched.discard(job_id)  # stopped on purpose: not announced as a failure
                self.background(lambda: jobs.cancel(ws, job_id), lambda _: self.reload(),
                                group="stop", title="Could not stop the server", modal=True)

        where = served.url or "(still loading)"
        self.app.push_screen(ConfirmDialog(f"Stop the server at {where}?", "Answers in progress are "
                                           "cut off. Starting it again: s, or resume its job.",
                                           confirm="Stop"), answered)

    def action_log(self) -> None:
        served = self._selected_server()
        if served is not None and served.job is not None:
            self.appliance.open_job(served.job.id)

    # -- keys -------------------------------------------------------------------------------------
    def action_new_key(self) -> None:
        ws = self.ws

        def named(name: str | None) -> None:
            if name:
                self.background(lambda: keys.create(ws, name),
                                lambda key: self._created(name, key),
                                group="key", title="Could not create the key", modal=True)

        self.app.push_screen(KeyDialog(), named)

    def _created(self, name: str, key: str) -> None:
        self.reload()
        self.app.push_screen(KeyShown(name, key))

    def action_revoke(self) -> None:
        info = self._selected_key()
        if info is None:
            self.notify("no key selected", severity="warning")
            return
        if info.revoked:
            self.notify(f"{info.name} is already revoked", severity="warning")
            return
        ws = self.ws

        def answered(yes: bool | None) -> None:
            if yes:
                self.background(lambda: keys.revoke(ws, info.id), lambda _: self.reload(),
                                group="revoke", title="Could not revoke the key", modal=True)

        self.app.push_screen(ConfirmDialog(f"Revoke key {info.name} ({info.id})?",
                                           "Running servers refuse it from their next request. "
                                           "This cannot be undone.", confirm="Revoke"), answered)

DIALOGS = (StartDialog, KeyDialog, KeyShown)
