"""The Textual app. At this stage one screen: the workspace overview (models, datasets, status).

Data comes from the core (`appliance.workspace`) in a thread worker, so a slow disk never blocks
the first paint; the App takes its Workspace from the caller so tests can pass a small real one.
"""

from __future__ import annotations

from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Footer, Header, Static
from textual.worker import Worker, WorkerState

from appliance import offline
from appliance.workspace import ArtifactRecord, Workspace


def _params(n: int | None) -> str:
    return f"{n / 1e6:.1f}M" if n else "?"


class Overview(Vertical):
    """Workspace path, offline status, and the models and datasets tables."""

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        yield Static("Models", classes="heading")
        yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
        yield Static("Datasets", classes="heading")
        yield DataTable(id="datasets", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#models", DataTable).add_columns(
            "name", "architecture", "params", "context", "dtype")
        self.query_one("#datasets", DataTable).add_columns(
            "name", "model", "form", "train", "eval", "rejected")


class ApplianceApp(App[int]):
    TITLE = "appliance"
    SUB_TITLE = "offline LLM adaptation and deployment"
    CSS = """
    .heading { text-style: bold; margin-top: 1; }
    #status { height: auto; color: $text-muted; }
    DataTable { height: auto; max-height: 12; }
    """
    BINDINGS: ClassVar = [
        Binding("r", "refresh", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, workspace: Workspace, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workspace = workspace

    def compose(self) -> ComposeResult:
        yield Header()
        yield Overview()
        yield Footer()

    def on_mount(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        self.query_one("#status", Static).update(f"workspace {self.workspace.root}  ·  loading…")
        self.load_workspace()

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def load_workspace(self) -> tuple[list[ArtifactRecord], list[ArtifactRecord]]:
        if not self.workspace.exists():
            return [], []
        return self.workspace.list("model"), self.workspace.list("dataset")

    @on(Worker.StateChanged)
    def _worker_done(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group != "load":
            return
        if worker.state == WorkerState.ERROR:
            self.notify(str(worker.error), title="Could not read the workspace", severity="error")
            return
        if worker.state != WorkerState.SUCCESS or worker.result is None:
            return
        models, datasets = worker.result
        self._fill(models, datasets)

    def _fill(self, models: list[ArtifactRecord], datasets: list[ArtifactRecord]) -> None:
        table = self.query_one("#models", DataTable)
        table.clear()
        for r in models:
            s = r.summary
            table.add_row(r.name, s.get("architecture", "?"), _params(s.get("parameters")),
                          str(s.get("context_length", "?")), s.get("dtype", "?"), key=r.name)
        table = self.query_one("#datasets", DataTable)
        table.clear()
        for r in datasets:
            s = r.summary
            table.add_row(r.name, s.get("model", "?"), s.get("form", "?"), str(s.get("train", 0)),
                          str(s.get("eval", 0)), str(s.get("rejected", 0)), key=r.name)
        guard = "offline guard on" if offline.installed() else "offline guard OFF"
        hint = "" if models else "  ·  no models yet: `appliance demo` imports the default one"
        self.query_one("#status", Static).update(
            f"workspace {self.workspace.root}  ·  {guard}  ·  {len(models)} models, "
            f"{len(datasets)} datasets{hint}")


def run(workspace: Workspace) -> int:
    return ApplianceApp(workspace).run() or 0
