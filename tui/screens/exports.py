"""Exports: the deployable artifacts with their parity verdicts, and the merge / export / verify jobs
that make and check them.

Each export is its own artifact (`<run>-merged`, `<run>-gguf-<type>`, `<run>-onnx-<precision>`)
whose `parity.json` holds the gate's numbers against the merged model; the table here is that file,
pass or fail per artifact. Merges and exports are jobs (the same the CLI starts: `merge`, `export`,
`verify`); while they run, the line below the table names the artifact each works on and draws a
gauge of its current stage (merging tensors, quantizing tensors, scoring conversations; a stage of
unknown size, such as llama.cpp's converter before it writes, is named without one), refreshed on
the screen's poll; the list refreshes when they end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Input, Select, SelectionList

from appliance import api
from appliance.stages.export import DEFAULT_TYPES, GGUF_OFFERED, ONNX_PRECISIONS, ExportRequest
from appliance.stages.export.request import DEFAULT_CALIBRATE, DEFAULT_IMATRIX, PLAN, PLAN_TYPES
from appliance.stages.merge.request import BASES, DEFAULT_BASE, DEFAULT_DTYPE, DTYPES, MergeRequest
from appliance.stages.verify.request import VerifyRequest
from appliance.workspace import ArtifactRecord
from tui.dialogs import FormDialog, NamedSelect, dialog_css
from tui.screens.base import ArtifactScreen, artifact_css, record_names
from tui.widgets import TickList, middle

TABLE_MIN_WIDTH = 84  # narrower than this, each artifact is shown as a small card


def _verdict(row: dict[str, Any]) -> Text:
    if row.get("passed") is True:
        return Text("pass", style="bold green")
    if row.get("passed") is None:
        return Text("reported", style="dim")
    return Text("FAIL", style="bold red")


def _numbers(r: dict[str, Any]) -> list[str]:
    ids = {True: "same", False: "DIFF", None: "-"}[r.get("tokens_identical")]
    return [f"{r['perplexity']:.3f}", f"{r['ppl_increase']:+.2%}", f"{r['kl']:.4f}",
            f"{r['agreement']:.2%}", ids]


def _speed(r: dict[str, Any]) -> str:
    value = r.get("decode_tokens_per_s")
    return "-" if value is None else f"{value:.1f}"


def _reasons(r: dict[str, Any]) -> Text | None:
    if r.get("passed") is not False:
        return None
    return Text(f"  {r['name']}: " + "; ".join(r.get("reasons", [])), style="red")


class ParityTable:
    """parity.json as a table with pass/fail per artifact, the reasons for each failure below;
    on a narrow terminal, one card per artifact so no column is cut."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        report, ref = self.report, self.report["reference"]
        yield Text(f"parity on {report['conversations']} held-out conversations, {report['tokens']}"
                   f" assistant tokens; reference {ref['name']} (perplexity "
                   f"{ref['perplexity']:.3f})")
        rows = report["artifacts"]
        yield self._table(rows) if options.max_width >= TABLE_MIN_WIDTH else self._cards(rows)
        yield from filter(None, map(_reasons, rows))

    @staticmethod
    def _table(rows: list[dict[str, Any]]) -> Table:
        timed = any(r.get("decode_tokens_per_s") is not None for r in rows)  # gates since it was timed
        table = Table(box=None, padding=(0, 1), header_style="bold")
        for column in ("artifact", "type", "ppl", "Δppl", "KL", "agree", "ids",
                       *(["tok/s"] if timed else []), "verdict"):
            table.add_column(column, justify="left" if column in ("artifact", "type", "verdict")
                             else "right", no_wrap=True)
        for r in rows:
            table.add_row(r["name"], r["kind"], *_numbers(r), *([_speed(r)] if timed else []), _verdict(r))
        return table

    @staticmethod
    def _cards(rows: list[dict[str, Any]]) -> Group:
        cards = []
        for r in rows:
            ppl, delta, kl, agree, ids = _numbers(r)
            speed = f" · {_speed(r)} tok/s" if r.get("decode_tokens_per_s") is not None else ""
            cards.append(Text.assemble(_verdict(r), f" {r['name']} ({r['kind']})\n",
                                       f"  ppl {ppl} ({delta}) · KL {kl} · agree {agree} · ids {ids}{speed}"))
        return Group(*cards)


class FrontierTable:
    """The run's exports side by side (appliance.stages.verify.frontier): what each costs on disk,
    loses against the merged model and decodes at on this box; * on those no other export beats on
    size, Δppl and speed at once."""

    def __init__(self, run: str, rows: list[Any]) -> None:
        self.run, self.rows = run, rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(f"\n{self.run}'s exports (* = nothing smaller, closer and faster at once):")
        table = Table(box=None, padding=(0, 1), header_style="bold")
        for column in ("", "type", "MiB", "Δppl", "KL", "agree", "tok/s"):
            table.add_column(column, justify="left" if column in ("", "type") else "right", no_wrap=True)
        for r in self.rows:
            table.add_row("*" if r.frontier else "", r.type, f"{r.size_bytes / 2**20:.0f}",
                          "-" if r.ppl_increase is None else f"{r.ppl_increase:+.2%}",
                          "-" if r.kl is None else f"{r.kl:.4f}",
                          "-" if r.agreement is None else f"{r.agreement:.0%}",
                          "-" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}",
                          style="bold" if r.frontier else ("red" if r.status == "failed" else ""))
        yield table


def export_details(path: Path, ws: Any = None) -> Group:
    """The export's manifest, its parity report and (with `ws`) its run's frontier."""
    from appliance import licences, manifest

    data = manifest.read(path)
    lines = [f"{data['name']}  ({data.get('status', 'ready')})",
             "parents  " + ", ".join(f"{p['kind']} {p['name']}" for p in data["parents"]),
             "config   " + json.dumps(data["config"], sort_keys=True)]
    carried = data.get("info", {}).get("licenses")
    if carried is not None:  # exports made before licences travelled have no such key
        found = licences.summary(carried) or ["none found at import (no licence text or id)"]
        lines += ["licences " + "\n         ".join(found)]
    lines.append("")
    report = path / "parity.json"
    body: list[Any] = [Text("\n".join(lines))]
    if report.exists():
        body.append(ParityTable(json.loads(report.read_text(encoding="utf-8"))))
    else:
        body.append(Text("no parity report", style="dim"))
    run = data["config"].get("run")
    if ws is not None and run and data["config"].get("format") in ("gguf", "onnx"):
        from appliance.stages.verify import frontier

        body.append(FrontierTable(run, frontier.frontier(ws, run)))
    return Group(*body)


JobRequest = MergeRequest | ExportRequest | VerifyRequest
BASE_LABELS = {"full": "full base (as imported)", "nf4": "NF4-rounded base (as training saw it)"}
# below 6 bits, from the run's training chats; a file: `appliance export gguf --imatrix FILE`
IMATRIX_OPTIONS = [("auto (training chats)", "auto"), ("off", "off")]
# int4's 8-bit weights: measured on the run's training chats, or the fixed list (`--calibrate off`)
CALIBRATE_OPTIONS = [("measured (training chats)", "auto"), ("fixed (head, down, v)", "off")]
FORMAT_OPTIONS = [("GGUF (llama.cpp, Ollama)", "gguf"), ("ONNX (onnxruntime)", "onnx"),
                  ("plan: GGUF and ONNX candidates side by side", PLAN)]


class RunDialog(FormDialog[JobRequest]):
    """A form about one of the finished runs (the newest preselected), then its options; the
    request it makes is checked before the form closes, each problem shown at its field."""

    def __init__(self, runs: list[str]) -> None:
        super().__init__()
        self.runs = runs

    def compose_fields(self) -> ComposeResult:
        yield NamedSelect([(r, r) for r in self.runs], value=self.runs[-1], allow_blank=False,
                          id="run", field_name="run")
        yield from self.compose_options()

    def compose_options(self) -> ComposeResult:
        yield from ()


class MergeDialog(RunDialog):
    HELP_TITLE = "merge a run"
    DEFAULT_CSS = dialog_css("MergeDialog")
    HEADING = "Merge a run's adapter into a full-precision copy of its base"
    SUBMIT = "Merge"

    def compose_options(self) -> ComposeResult:
        yield NamedSelect([(BASE_LABELS.get(b, b), b) for b in BASES], value=DEFAULT_BASE,
                          allow_blank=False, id="base", field_name="merge into")
        yield NamedSelect([(d, d) for d in DTYPES], value=DEFAULT_DTYPE,
                          allow_blank=False, id="dtype", field_name="dtype of the merged model")

    def submit(self) -> None:
        run, base, dtype = (str(self.query_one(f"#{k}", Select).value) for k in ("run", "base", "dtype"))
        request = MergeRequest(run, dtype=dtype, base=base)
        self.dismiss_checked(request, request.problems)


class ExportDialog(RunDialog):
    """One format and its types; or `plan`: GGUF types and ONNX precisions side by side in one job,
    whose exports the details pane then lists as the run's frontier (as `appliance export plan`)."""

    HELP_TITLE = "export a run"
    DEFAULT_CSS = dialog_css("ExportDialog") + """
    ExportDialog #lists { height: auto; }
    ExportDialog SelectionList { height: auto; width: 1fr; }
    ExportDialog #options { height: auto; }
    ExportDialog #options Input { width: 1fr; }
    ExportDialog #options Select { width: 34; }
    """
    HEADING = "Export a run (merged first), each artifact parity-checked"
    SUBMIT = "Export"

    def compose_options(self) -> ComposeResult:
        yield NamedSelect(FORMAT_OPTIONS, value="gguf", allow_blank=False, id="format", field_name="format")
        with Horizontal(id="lists"):  # a plan's two lists side by side: the form keeps 80x24
            yield TickList(id="types")
            yield TickList(id="onnx-types")
        with Horizontal(id="options"):  # one row: the 80x24 form keeps its buttons in view
            yield Input(placeholder="more types (any llama.cpp type)", id="more")
            yield NamedSelect(IMATRIX_OPTIONS, value=DEFAULT_IMATRIX, allow_blank=False, id="imatrix",
                              field_name="importance matrix")
            yield NamedSelect(CALIBRATE_OPTIONS, value=DEFAULT_CALIBRATE, allow_blank=False,
                              id="calibrate", field_name="int4 8-bit layout")

    def on_mount(self) -> None:
        self._types("gguf")

    def _types(self, fmt: str) -> None:
        gguf, onnx = (PLAN_TYPES["gguf"], PLAN_TYPES["onnx"]) if fmt == PLAN else (
            DEFAULT_TYPES["gguf"], DEFAULT_TYPES["onnx"])
        first = ONNX_PRECISIONS if fmt == "onnx" else GGUF_OFFERED
        self._fill("#types", first, onnx if fmt == "onnx" else gguf)
        self._fill("#onnx-types", ONNX_PRECISIONS if fmt == PLAN else (), onnx)
        shown = {"more": fmt == "gguf", "imatrix": fmt in ("gguf", PLAN),
                 "calibrate": fmt in ("onnx", PLAN), "onnx-types": fmt == PLAN}
        for widget, display in shown.items():
            self.query_one(f"#{widget}").display = display

    def _fill(self, selector: str, offered: tuple[str, ...], ticked: tuple[str, ...]) -> None:
        types = self.query_one(selector, SelectionList)
        types.clear_options()
        types.add_options([(t, t, t in ticked) for t in offered])

    @on(Select.Changed, "#format")
    def _format(self, event: Select.Changed) -> None:
        self._types(str(event.value))

    def _more(self) -> list[str]:
        if str(self.query_one("#format", Select).value) != "gguf":
            return []
        return [t.strip() for t in self.query_one("#more", Input).value.split(",") if t.strip()]

    def field_widget(self, field: str) -> str:
        if field == "types":  # only a typed type can be unknown: the ticked ones are all valid
            return "#more" if self._more() else "#types"
        return super().field_widget(field)

    def submit(self) -> None:
        fmt = str(self.query_one("#format", Select).value)
        types = [*self.query_one("#types", SelectionList).selected, *self._more(),
                 *(self.query_one("#onnx-types", SelectionList).selected if fmt == PLAN else [])]
        if not types:  # none is a valid request (only the merged model), but not this form's
            self.show_problems({"types": "pick at least one type"})
            return
        imatrix = str(self.query_one("#imatrix", Select).value) if fmt != "onnx" else DEFAULT_IMATRIX
        calibrate = str(self.query_one("#calibrate", Select).value) if fmt != "gguf" else DEFAULT_CALIBRATE
        request = ExportRequest(str(self.query_one("#run", Select).value), fmt, tuple(types),
                                imatrix=imatrix, calibrate=calibrate)
        self.dismiss_checked(request, request.problems)


class ExportsScreen(ArtifactScreen):
    MODE = "exports"
    SUB_TITLE = "Exports"
    JOB_KINDS = ("merge", "export", "verify")
    FULL_PROFILE_ACTIONS: ClassVar[dict[str, str]] = {k: k for k in ("merge", "export", "verify")}
    # textual annotates it `ClassVar[...] | None`, which mypy reads as an instance variable
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (150, "-wide")]  # type: ignore[misc]
    DEFAULT_CSS = artifact_css("ExportsScreen", 62)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("m", "merge", "Merge…"),
        Binding("e", "export", "Export…"),
        Binding("v", "verify", "Verify again"),
        Binding("x,delete", "delete", "Delete"),
    ]

    KIND = "export"
    ROW_ACTIONS = ("delete", "verify")
    COLUMNS = ("name", "parity", "status", "type")
    NAME_WIDTH = 36  # 80 columns hold every column; the details pane shows the whole name
    EMPTY = ("No exports yet.\n\n  e  exports a finished run to GGUF, ONNX or both side by side (plan),\n"
             "     merging it first\n"
             "  m  merges a run's adapter into its base")
    DELETE_NOTE = "The artifact's files are removed from the workspace."

    def row(self, record: ArtifactRecord) -> tuple[Any, ...]:
        return (middle(record.name, self.NAME_WIDTH), _parity_cell(record.summary.get("parity")),
                record.status, record.summary.get("type", "?"))

    def read_details(self, path: Path) -> Group:
        return export_details(path, self.ws)

    # -- actions ---------------------------------------------------------------------------
    def _with_runs(self, open_dialog: type[MergeDialog] | type[ExportDialog]) -> None:
        ws = self.ws

        def ask(runs: list[str]) -> None:
            if not runs:
                self.notify("no finished runs yet: train one (4 Train) first", title="Nothing to "
                            "export", severity="warning")
                return
            self.app.push_screen(open_dialog(runs), self._start)

        self.background(lambda: record_names(ws, "run"), ask, group="runs")

    def action_merge(self) -> None:
        self._with_runs(MergeDialog)

    def action_export(self) -> None:
        self._with_runs(ExportDialog)

    def action_verify(self) -> None:
        name = self.selected()
        if name is not None:
            self._start(VerifyRequest(name))

    def _start(self, request: JobRequest | None) -> None:
        if request is None:
            return
        ws = self.ws
        self.background(lambda: api.start_request(ws, request), self.job_started,
                        group="start", title=f"Could not start the {request.kind}", modal=True)


def _parity_cell(value: str | None) -> Text:
    style = {"pass": "green", "FAIL": "bold red"}.get(value or "", "dim")
    return Text(value or "-", style=style)


DIALOGS = (MergeDialog, ExportDialog)
