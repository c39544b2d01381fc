"""Models: the base models in the workspace, their details, import and delete.

Imports run as `import-model` jobs (the same the CLI's `models import --detach` starts): a 7B folder
takes minutes to copy and check, and must survive the UI closing. Details come from the manifest
(what import recorded: architecture, sizes, tokens, the chat template, every file's sha256), read
in a worker; `v` re-hashes every file against it (the activity line counts the time it takes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Input

from appliance import api, jobs, manifest, stack
from appliance.errors import ApplianceError
from appliance.stages.models.request import ImportModelRequest
from appliance.textout import human_count
from appliance.workspace import ArtifactRecord, Workspace
from tui.dialogs import PathFormDialog, dialog_css
from tui.screens.base import ArtifactScreen, artifact_css

HASH_CHARS = 16
TEMPLATE_LINES = 14


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def source_text(config: dict[str, Any]) -> str:
    """Where a model came from, by file name only (paths differ between machines)."""
    source = config.get("source") or {}
    if isinstance(source, str):
        return source
    kind = source.get("type", "?")
    name = Path(source["path"]).name if source.get("path") else ""
    return f"{kind} · {name}" if name else kind


def model_details(data: dict[str, Any]) -> str:
    """The manifest of a model as the details pane shows it (plain text, no markup)."""
    info = data.get("info", {})
    rows = [("architecture", f"{info.get('architecture')} ({info.get('family')})"),
            ("parameters", f"{human_count(info.get('parameters'))} ({info.get('parameters')})"),
            ("context", info.get("context_length")),
            ("vocabulary", f"{info.get('vocab_size')} (tokenizer {info.get('tokenizer_size')})"),
            ("dtype", info.get("dtype")),
            ("bos / eos", f"{info.get('bos_token')} / {info.get('eos_token')}"),
            ("stop tokens", ", ".join(info.get("stop_tokens") or []) or "?"),
            ("system turn", "supported" if info.get("supports_system") else "not supported"),
            ("source", source_text(data.get("config", {})))]
    if info.get("gguf_file"):
        rows.append(("inference GGUF", info["gguf_file"]))
    lines = [f"{data.get('name')}", *(f"  {k:<15}{v}" for k, v in rows), "", "chat template"]
    template = (info.get("chat_template") or "").splitlines()
    lines += [f"  {t}" for t in template[:TEMPLATE_LINES]]
    if len(template) > TEMPLATE_LINES:
        lines.append(f"  … {len(template) - TEMPLATE_LINES} more lines")
    files = data.get("files", {})
    total = sum(f["size"] for f in files.values())
    lines += ["", f"files: {len(files)}, {human_size(total)} (sha256)"]
    width = max((len(n) for n in files), default=0)
    lines += [f"  {name:<{width}}  {human_size(f['size']):>10}  {f['sha256'][:HASH_CHARS]}…"
              for name, f in sorted(files.items())]
    return "\n".join(lines)


def start_import(ws: Workspace, request: ImportModelRequest) -> jobs.Job:
    """An `import-model` job: for a path, or for the embedded default (refused here, before a job,
    if it is imported already or not installed)."""
    if request.default:
        if ws.exists() and ws.artifact_dir("model", stack.DEFAULT_MODEL_NAME).exists():
            raise ApplianceError(f"model {stack.DEFAULT_MODEL_NAME!r} is already imported",
                                 title="Already imported", hint="delete it first (x) to import "
                                 "it again")
        stack.default_model_path()  # not installed: say so now, not in a job log
    return api.start_request(ws, request)


class ImportModelDialog(PathFormDialog[ImportModelRequest]):
    """Path (typed or browsed), optional name and chat template; the request is checked before
    the form closes (a path that does not exist, a bad name: shown at the field)."""

    HELP_TITLE = "import a model"
    DEFAULT_CSS = dialog_css("ImportModelDialog") + """
    ImportModelDialog .row { height: auto; }
    ImportModelDialog .row Input { width: 1fr; }
    """
    HEADING = "Import a model: an HF folder (safetensors) or a .gguf file"
    SUBMIT, SUBMIT_ID = "Import", "import"
    BROWSE_TITLE, SUFFIXES, FOLDERS = "Pick a model folder or .gguf file", (".gguf",), True
    AFTER_BROWSE = "#import"
    FIELDS: ClassVar[dict[str, str]] = {"chat_template": "#template"}

    def compose_options(self) -> ComposeResult:
        yield Input(placeholder="name (default: from the path)", id="name")
        yield Input(placeholder="chat template file (only if the model has none)", id="template")

    def submit(self) -> None:
        path = self.path()
        if not path:
            self.show_problems({"path": "give a path, or browse to one"})
            return
        name = self.query_one("#name", Input).value.strip() or None
        template = self.query_one("#template", Input).value.strip() or None
        request = ImportModelRequest.for_path(path, name, template)
        self.dismiss_checked(request, request.problems)


class ModelsScreen(ArtifactScreen):
    MODE = "models"
    SUB_TITLE = "Models"
    JOB_KINDS = ("import-model",)
    DEFAULT_CSS = "ModelsScreen #models { max-height: 100%; }" + artifact_css("ModelsScreen", 60)
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("i", "import_path", "Import…"),
        Binding("d", "import_default", "Default model"),
        Binding("x,delete", "delete", "Delete"),
        Binding("v", "verify", "Verify"),
    ]

    KIND = "model"
    ROW_ACTIONS = ("delete", "verify")
    COLUMNS = ("name", "architecture", "params", "context")
    DETAILS_MARKUP = False
    EMPTY = ("No models yet.\n\n  d  imports the embedded default (SmolLM2-135M-Instruct)\n"
             "  i  imports an HF folder or a .gguf file from disk")
    DELETE_NOTE = ("Its folder is removed from the workspace. Datasets and runs made from it stay, "
                   "but cannot be retrained or exported without it.")

    def row(self, record: ArtifactRecord) -> tuple[str, ...]:
        return (record.name, record.summary.get("architecture", "?"),
                human_count(record.summary.get("parameters")),
                str(record.summary.get("context_length", "?")))

    def read_details(self, path: Path) -> str:
        return model_details(manifest.read(path))

    # -- actions ---------------------------------------------------------------------------
    def action_import_path(self) -> None:
        start = self.appliance.settings.browse_from or Path.cwd()
        self.app.push_screen(ImportModelDialog(start), self._dialog_done)

    def _dialog_done(self, request: ImportModelRequest | None) -> None:
        if request is not None:
            self._start_import(request)

    def action_import_default(self) -> None:
        self._start_import(ImportModelRequest(default=True))

    def _start_import(self, request: ImportModelRequest) -> None:
        ws = self.ws
        self.background(lambda: start_import(ws, request), self.job_started, group="import",
                        title="Could not start the import", modal=True)

    def deleted(self, name: str) -> None:
        self.notify(f"model {name} deleted", title="Deleted")
        self.reload()

    def action_verify(self) -> None:
        name, ws = self.selected(), self.ws
        if name is None:
            return
        self.start_task("verify", f"verifying {name}: hashing every file")

        def work() -> None:
            try:
                manifest.verify(ws.artifact_dir("model", name), full=True)
            finally:
                self.app.call_from_thread(self.end_task, "verify")

        self.background(work, lambda _: self.notify(f"{name}: every file matches its sha256",
                                                    title="Verified"),
                        group="verify", title="Verification failed", modal=True)


DIALOGS = (ImportModelDialog,)
