"""Datasets: import a JSONL file for a model with its validation report, and preview what training
will see.

The import runs `appliance.stages.datasets.importer.import_file` in a worker (it measures every
conversation with the model's tokenizer; the report accounts for every line: kept, duplicate,
or rejected with its reason). The preview renders a conversation with the model's chat template through
`appliance.chat.render_and_mask`, the function training uses, and highlights the assistant spans:
exactly the characters the loss is computed on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Select, Static

from appliance.stages.datasets.request import (
    DEFAULT_EVAL_FRACTION,
    DEFAULT_FORMAT,
    FORMATS,
    ImportDatasetRequest,
)
from appliance.workspace import ArtifactRecord, Workspace
from tui.dialogs import NamedSelect, PathFormDialog, dialog_css, named
from tui.screens.base import ArtifactScreen, artifact_css, record_names
from tui.widgets import histogram_lines

SHOWN_REJECTIONS = 50
TRAINED_STYLE = "bold black on green"


def report_text(report: dict[str, Any], source: str = "") -> str:
    """The validation report as the details pane shows it (what `appliance data show` prints)."""
    lines = [f"source {source}"] if source else []
    lines.append(f"form {report['form']}: {report['lines']} lines → {report['kept']} kept "
                 f"({report['train']} train / {report['eval']} eval), {report['rejected']} rejected, "
                 f"{report['duplicates']} exact duplicates removed")
    tokens = report.get("tokens", {})
    if tokens.get("count"):
        lines.append(f"tokens per conversation: min {tokens['min']}, p50 {tokens['p50']}, mean "
                     f"{tokens['mean']}, p95 {tokens['p95']}, max {tokens['max']} "
                     f"(total {tokens['total']})")
        lines += ["", "length histogram (tokens)", *histogram_lines(tokens.get("histogram", []))]
    if report["rejected_by_reason"]:
        lines += ["", "rejected, by reason"]
        lines += [f"  {reason}: {n}" for reason, n in sorted(report["rejected_by_reason"].items())]
        lines += [f"  line {r['line']}: {r['reason']}" for r in report["rejections"][:SHOWN_REJECTIONS]]
        if len(report["rejections"]) > SHOWN_REJECTIONS:
            lines.append(f"  … {len(report['rejections']) - SHOWN_REJECTIONS} more "
                         "(appliance data show NAME --rejections N)")
    if report["duplicate_lines"]:
        lines += ["", "duplicates"]
        lines += [f"  line {d['line']}: duplicate of line {d['duplicate_of']}"
                  for d in report["duplicate_lines"][:SHOWN_REJECTIONS]]
    return "\n".join(lines)


def read_report(record_path: Path) -> str:
    from appliance import manifest

    data = manifest.read(record_path)
    report = json.loads((record_path / "report.json").read_text(encoding="utf-8"))
    source = Path(data["config"]["source"]["path"]).name
    return report_text(report, f"{source} (model {data['info']['summary']['model']})")


def run_import(ws: Workspace, request: ImportDatasetRequest,
               progress: Any) -> tuple[str, dict[str, Any]]:
    from appliance.stages.datasets import importer as datasets

    record, report = datasets.run(ws, request, progress)
    return record.name, report


class ImportDatasetDialog(PathFormDialog[ImportDatasetRequest]):
    """File (typed or browsed), the model whose tokenizer and template measure it, options."""

    HELP_TITLE = "import a dataset"
    DEFAULT_CSS = dialog_css("ImportDatasetDialog") + """
    ImportDatasetDialog .row { height: auto; }
    ImportDatasetDialog .row Input, ImportDatasetDialog .row Select { width: 1fr; }
    """
    HEADING = "Import a dataset (JSONL: messages, sharegpt, alpaca or dolly)"
    SUBMIT, SUBMIT_ID = "Import", "import"
    PATH_PLACEHOLDER = "file"
    BROWSE_TITLE, SUFFIXES, AFTER_BROWSE = "Pick a JSONL dataset", (".jsonl", ".json"), "#model"
    FIELDS: ClassVar[dict[str, str]] = {"eval_fraction": "#eval"}

    def __init__(self, models: list[str], browse_from: Path) -> None:
        super().__init__(browse_from)
        self.models = models

    def compose_options(self) -> ComposeResult:
        yield NamedSelect([(m, m) for m in self.models], prompt="model (tokenizer + template)",
                          value=self.models[0] if len(self.models) == 1 else Select.NULL, id="model",
                          field_name="for model (its tokenizer and template)")
        yield Input(placeholder="name (default: from the file name)", id="name")
        with Horizontal(classes="row"):
            yield NamedSelect([(f, f) for f in FORMATS], value=DEFAULT_FORMAT, allow_blank=False,
                              id="form", field_name="format")
            yield named(Input(str(DEFAULT_EVAL_FRACTION), placeholder="eval fraction", id="eval"),
                        "held out for eval (fraction)")

    def submit(self) -> None:
        model = self.query_one("#model", Select).value
        text = self.query_one("#eval", Input).value.strip()
        try:
            fraction = float(text)
        except ValueError:
            self.show_problems({"eval_fraction": f"a number in [0, 1), got {text!r}"})
            return
        request = ImportDatasetRequest.for_path(
            self.path(), "" if model is Select.NULL else str(model),
            name=self.query_one("#name", Input).value.strip() or None,
            form=str(self.query_one("#form", Select).value), eval_fraction=fraction)
        self.dismiss_checked(request, request.problems)


def render_preview(ws: Workspace, dataset: str, index: int) -> tuple[Text, int]:
    """Conversation `index` of a dataset's train split, rendered with its model's template, the
    trained (assistant) characters highlighted; and how many conversations there are."""
    from appliance import chat, manifest
    from appliance.hfmodel import load_tokenizer
    from appliance.stages.datasets import importer as datasets

    record = ws.get("dataset", dataset)
    model = ws.get("model", record.summary["model"])
    rows = datasets.load_rows(record, "train")
    index = index % len(rows)
    stops = manifest.read(model.path)["info"].get("stop_tokens") or []
    rendered = chat.render_and_mask(load_tokenizer(model.path), rows[index]["messages"], stops)
    text = Text(rendered.text)
    for start, end in rendered.spans:
        text.stylize(TRAINED_STYLE, start, end)
    head = Text(f"conversation {index + 1}/{len(rows)} of {dataset} (train, line "
                f"{rows[index].get('line', '?')}) · {len(rendered.input_ids)} tokens, "
                f"{rendered.trained_tokens} trained · ", style="bold")
    head.append("highlighted", style=TRAINED_STYLE)
    head.append(" = what the loss is computed on\n\n")
    return head + text, len(rows)


class PreviewScreen(ModalScreen[None]):
    """One conversation at a time, as the model's template renders it."""

    HELP_TITLE = "dataset preview"
    DEFAULT_CSS = """
    PreviewScreen { align: center middle; }
    PreviewScreen > VerticalScroll {
        width: 100%; height: 100%; border: thick $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n,right", "step(1)", "Next conversation"),
        Binding("b,left", "step(-1)", "Previous conversation"),
        Binding("escape,q", "close", "Close"),
    ]

    def __init__(self, ws: Workspace, dataset: str) -> None:
        super().__init__()
        self.ws, self.dataset, self.index = ws, dataset, 0

    def compose(self) -> ComposeResult:
        with VerticalScroll() as box:
            box.border_subtitle = "n / → next · b / ← previous · esc closes"
            yield Static("loading the model's tokenizer…", id="preview")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
        self.action_step(0)

    def action_step(self, delta: int) -> None:
        self.index += delta
        ws, dataset, index = self.ws, self.dataset, self.index
        self.run_worker(lambda: self._load(ws, dataset, index), thread=True, exclusive=True,
                        group="preview", exit_on_error=False)

    def _load(self, ws: Workspace, dataset: str, index: int) -> None:
        try:
            text, count = render_preview(ws, dataset, index)
        except Exception as exc:
            self.app.call_from_thread(self.app.show_error, exc,  # type: ignore[attr-defined]
                                      title="Could not render the preview")
            return
        self.app.call_from_thread(self._shown, text, index % count)

    def _shown(self, text: Text, index: int) -> None:
        self.query_one("#preview", Static).update(text)
        self.index = index

    def action_close(self) -> None:
        self.dismiss(None)


class DatasetsScreen(ArtifactScreen):
    MODE = "datasets"
    SUB_TITLE = "Datasets"
    DEFAULT_CSS = artifact_css("DatasetsScreen", 66, "report")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("i", "import_file", "Import…"),
        Binding("p", "preview", "Preview"),
        Binding("x,delete", "delete", "Delete"),
    ]
    KIND = "dataset"
    ROW_ACTIONS = ("delete", "preview")
    COLUMNS = ("name", "model", "form", "train", "eval", "rejected", "dups")
    DETAILS_ID, DETAILS_MARKUP = "report", False
    EMPTY = ("No datasets yet.\n\n  i  imports a JSONL file for one of the models "
             "(the Dolly sample ships in appliance/data/dolly-sample/)")
    DELETE_NOTE = "Its train/eval files and report are removed from the workspace."

    def row(self, record: ArtifactRecord) -> tuple[str, ...]:
        keys = ("model", "form", "train", "eval", "rejected", "duplicates")
        return (record.name, *(str(record.summary.get(k, "")) for k in keys))

    def read_details(self, path: Path) -> str:
        return read_report(path)

    # -- actions ---------------------------------------------------------------------------
    def action_import_file(self) -> None:
        ws = self.ws
        self.background(lambda: record_names(ws, "model"), self._ask_import, group="models")

    def _ask_import(self, models: list[str]) -> None:
        if not models:
            self.notify("import a model first (2 Models, then d or i): a dataset is measured "
                        "with its model's tokenizer and template", title="No models",
                        severity="warning")
            return
        start = self.appliance.settings.browse_from or Path.cwd()
        self.app.push_screen(ImportDatasetDialog(models, start), self._import)

    def _import(self, request: ImportDatasetRequest | None) -> None:
        if request is None:
            return
        source = Path(request.path).name
        self.start_task("import", f"importing {source} for {request.model}")
        ws, app = self.ws, self.app

        def progress(lines: int) -> None:
            app.call_from_thread(self.update_task, "import", f"importing {source}: {lines} lines "
                                                             "read")

        def work() -> tuple[str, dict[str, Any]]:
            try:
                return run_import(ws, request, progress)
            finally:
                app.call_from_thread(self.end_task, "import")

        self.background(work, self._imported, group="import", title="Import failed", modal=True)

    def _imported(self, result: tuple[str, dict[str, Any]]) -> None:
        name, report = result
        self.notify(f"{name}: {report['kept']} conversations kept, {report['rejected']} rejected, "
                    f"{report['duplicates']} duplicates", title="Dataset imported")
        self.select_after = name
        self.reload()

    def action_preview(self) -> None:
        name = self.selected()
        if name is not None:
            self.app.push_screen(PreviewScreen(self.ws, name))


DIALOGS = (ImportDatasetDialog, PreviewScreen)
