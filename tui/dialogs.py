"""Modal dialogs: confirm a destructive action, show an error an operator can act on, pick a file.

Each is a typed `ModalScreen[T]` dismissed with its answer, every button has a key, and Escape always
backs out, so nothing here needs a mouse. A form that builds a stage's typed request checks it
before it closes (`FormDialog.dismiss_checked`): each problem is shown at its field (the field
marked `-invalid`, the message on the line below it) and the form stays open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar, TypeVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, DirectoryTree, Input, Label, Select, Static

R = TypeVar("R")
W = TypeVar("W", bound=Widget)

DIALOG_CSS = """
{name} {{ align: center middle; }}
{name} > Vertical {{
    width: 76; max-width: 100%; height: auto; max-height: 100%;
    border: thick $primary; background: $surface; padding: 0 1;
}}
{name} .title {{ text-style: bold; margin-bottom: 1; }}
{name} .buttons {{ height: auto; align-horizontal: right; margin-top: 1; }}
{name} Button {{ margin-left: 1; width: auto; min-width: 16; }}
{name} .problem {{ color: $error; height: auto; }}
{name} Select.-invalid > SelectCurrent, {name} SelectionList.-invalid {{ border: tall $error; }}
"""


def dialog_css(name: str) -> str:
    return DIALOG_CSS.format(name=name)


def named(widget: W, name: str) -> W:
    """A field's name in its top border: a prefilled field's placeholder is hidden by its value."""
    widget.border_title = name
    return widget


class NamedSelect(Select[str]):
    """A Select whose name stays visible once a value hides its prompt (in its box's border)."""

    def __init__(self, *args: object, field_name: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.field_name = field_name

    def on_mount(self) -> None:
        self.query_one("SelectCurrent").border_title = self.field_name  # the box Select draws


class ConfirmDialog(ModalScreen[bool]):
    """Yes/no before something that cannot be undone."""

    HELP_TITLE = "a confirmation"

    DEFAULT_CSS = dialog_css("ConfirmDialog")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, message: str, confirm: str = "Delete") -> None:
        super().__init__()
        self.title_text, self.message, self.confirm = title, message, confirm

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.message)
            with Horizontal(classes="buttons"):
                yield Button(f"{self.confirm} (y)", variant="error", id="yes")
                yield Button("Keep (n)", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class ErrorDialog(ModalScreen[None]):
    """An error with its title, what happened, and what to do about it."""

    HELP_TITLE = "an error"

    DEFAULT_CSS = dialog_css("ErrorDialog") + """
    ErrorDialog > Vertical { border: thick $error; }
    ErrorDialog .hint { color: $warning; margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter", "close", "Close")]

    def __init__(self, title: str, message: str, hint: str | None = None) -> None:
        super().__init__()
        self.title_text, self.message, self.hint = title, message, hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(self.message, markup=False, id="message")
            if self.hint:
                yield Static(f"→ {self.hint}", markup=False, classes="hint")
            with Horizontal(classes="buttons"):
                yield Button("Close (esc)", variant="primary", id="close")

    def action_close(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed)
    def _pressed(self) -> None:
        self.dismiss(None)


class FilteredTree(DirectoryTree):
    """Folders (not hidden) and files with one of the given suffixes."""

    def __init__(self, path: Path, suffixes: tuple[str, ...], *, id: str | None = None) -> None:
        super().__init__(path, id=id)
        self.suffixes = suffixes

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or p.suffix.lower() in self.suffixes)]


class FilePicker(ModalScreen[Path | None]):
    """Browse to a file (or a folder, when folders are acceptable) or type its path."""

    HELP_TITLE = "pick a file"

    DEFAULT_CSS = dialog_css("FilePicker") + """
    FilePicker > Vertical { height: 90%; }
    FilePicker FilteredTree { height: 1fr; border: round $panel; }
    FilePicker .help { color: $text-muted; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("backspace", "up", "Parent folder"),
        Binding("s", "choose", "Choose highlighted"),
    ]

    def __init__(self, title: str, start: Path, suffixes: tuple[str, ...], *,
                 folders: bool = False) -> None:
        super().__init__()
        self.title_text, self.start, self.suffixes, self.folders = title, start, suffixes, folders

    def compose(self) -> ComposeResult:
        kinds = ", ".join(self.suffixes) + (" or a folder" if self.folders else "")
        with Vertical():
            yield Label(self.title_text, classes="title")
            yield Static(f"{kinds}: enter opens a folder / takes a file, s takes the highlighted "
                         "entry, backspace goes up, tab to type a path", classes="help")
            yield FilteredTree(self.start, self.suffixes, id="tree")
            yield Input(placeholder="or type a path and press enter", id="path")

    def on_mount(self) -> None:
        self.query_one("#tree", FilteredTree).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_up(self) -> None:
        tree = self.query_one("#tree", FilteredTree)
        tree.path = Path(tree.path).resolve().parent

    def action_choose(self) -> None:
        node = self.query_one("#tree", FilteredTree).cursor_node
        if node is not None and node.data is not None:
            self._take(Path(node.data.path))

    def _take(self, path: Path) -> None:
        if path.is_dir() and not self.folders:
            self.notify(f"{path} is a folder; pick a {', '.join(self.suffixes)} file",
                        title="Not a file", severity="warning")
            return
        self.dismiss(path)

    @on(DirectoryTree.FileSelected)
    def _file(self, event: DirectoryTree.FileSelected) -> None:
        self._take(event.path)

    @on(Input.Submitted, "#path")
    def _typed(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self._take(Path(event.value.strip()).expanduser())


class FormDialog(ModalScreen[R | None]):
    """A form: a title, the fields of `compose_fields`, then a primary button and Cancel.

    The primary button (id `SUBMIT_ID`) and ctrl+s, from any field, call `submit`, which
    dismisses with the answer or notifies what is missing; Escape and Cancel dismiss with None."""

    HEADING: ClassVar[str] = ""
    SUBMIT: ClassVar[str] = "OK"
    SUBMIT_ID: ClassVar[str] = "go"
    FIELDS: ClassVar[dict[str, str]] = {}  # a request's field -> its widget, when not `#<field>`
    BINDINGS: ClassVar[list[BindingType]] = [Binding("ctrl+s", "submit", "Submit the form"),
                                             Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.HEADING, classes="title")
            yield from self.compose_fields()
            with Horizontal(classes="buttons"):
                yield Button(f"{self.SUBMIT} (ctrl+s)", variant="primary", id=self.SUBMIT_ID)
                yield Button("Cancel (esc)", id="cancel")

    def compose_fields(self) -> ComposeResult:
        yield from ()

    def submit(self) -> None:
        """Dismiss with the form's answer, or show what is wrong with it."""

    def dismiss_checked(self, answer: R, problems: Callable[[], Mapping[str, str]]) -> None:
        """Dismiss with `answer` if `problems()` (a request's, run in a thread: a check may load a
        library) finds nothing; else show each problem at its field and stay open. A check that
        fails itself dismisses: the door checks the request again and says what is wrong."""

        def check() -> None:
            try:
                found = dict(problems())
            except Exception:  # the door checks it again and reports it
                found = {}
            self.app.call_from_thread(done, found)

        def done(found: dict[str, str]) -> None:
            if not self.is_current:  # backed out meanwhile
                return
            if found:
                self.show_problems(found)
            else:
                self.dismiss(answer)

        self.run_worker(check, thread=True, group="check", exclusive=True, exit_on_error=False,
                        description="check the request")

    def field_widget(self, field: str) -> str:
        """The selector of the widget that edits a request's field."""
        return self.FIELDS.get(field, f"#{field}")

    def show_problems(self, found: Mapping[str, str]) -> None:
        """Each problem at its field: the widget marked `-invalid` (and the first one focused), its
        message on the line below; a field the form has no widget for, above the buttons."""
        body = self.query_one("#dialog", Vertical)
        for line in body.query(".problem"):
            line.remove()
        for widget in body.query(".-invalid"):
            widget.remove_class("-invalid")
        first: Widget | None = None
        for field, message in found.items():
            line = Static(f"✗ {field}: {message}", markup=False, classes="problem")
            matches = body.query(self.field_widget(field))
            if not matches:
                body.mount(line, before=body.query_one(".buttons"))
                continue
            widget = matches.first()
            widget.add_class("-invalid")
            first = first or widget
            anchor = widget
            while anchor.parent is not body and isinstance(anchor.parent, Widget):
                anchor = anchor.parent
            body.mount(line, after=anchor)
        if first is not None and first.focusable:
            first.focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_submit(self) -> None:
        self.submit()

    @on(Button.Pressed)
    def _form_button(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        elif event.button.id == self.SUBMIT_ID:
            self.submit()


class PathFormDialog(FormDialog[R]):
    """A form whose first field is a path, typed or browsed to with a `FilePicker`; enter in any
    field submits."""

    PATH_PLACEHOLDER: ClassVar[str] = "path"
    BROWSE_TITLE: ClassVar[str] = ""
    SUFFIXES: ClassVar[tuple[str, ...]] = ()
    FOLDERS: ClassVar[bool] = False
    AFTER_BROWSE: ClassVar[str] = ""  # the field focused once a path is picked (a selector)

    def __init__(self, browse_from: Path) -> None:
        super().__init__()
        self.browse_from = browse_from

    def compose_fields(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Input(placeholder=self.PATH_PLACEHOLDER, id="path")
            yield Button("Browse…", id="browse")
        yield from self.compose_options()

    def compose_options(self) -> ComposeResult:
        yield from ()

    def path(self) -> str:
        return self.query_one("#path", Input).value.strip()

    @on(Button.Pressed, "#browse")
    def _browse(self) -> None:
        def picked(path: Path | None) -> None:
            if path is not None:
                self.query_one("#path", Input).value = str(path)
                self.query_one(self.AFTER_BROWSE).focus()

        self.app.push_screen(FilePicker(self.BROWSE_TITLE, self.browse_from, self.SUFFIXES,
                                        folders=self.FOLDERS), picked)

    @on(Input.Submitted)
    def _entered(self) -> None:
        self.submit()
