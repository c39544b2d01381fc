"""Chat: talk to an exported artifact through the runtime's engine, or to two side by side.

The engines are the ones `appliance chat` and `appliance serve` use (`appliance.runtime`), opened
in a thread worker the first time an artifact is used and kept for the screen's life. The screen
lives as long as the app, so a conversation, its artifact and its engine survive a trip to other
screens; only choosing another artifact or "new conversation" (ctrl+r) starts over (a refresh that
re-reads the list of exports must not: it re-sets the selects, which Textual reports as changes). An answer is
generated in a thread worker that hands each piece of text to the UI thread, so typing, scrolling
and `ctrl+t` (stop) stay responsive while it streams. With a second artifact chosen, the same
prompt goes to both, one after the other (they share the CPU), each with its own conversation.
An export whose parity gate failed opens only with "allow failed parity" ticked, as on the CLI.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Checkbox, Input, Select, Static

from tui.dialogs import NamedSelect, named
from tui.screens.base import ApplianceScreen
from tui.widgets import TickBox

NONE = "(none)"
CSS = """
ChatScreen .settings { height: auto; }
ChatScreen .settings Select { width: 1fr; }
ChatScreen .settings Input { width: 13; }
ChatScreen #system { width: 1fr; }
ChatScreen .panes { height: 1fr; }
ChatScreen .pane { width: 1fr; border: round $panel; padding: 0 1; }
ChatScreen .user { color: $accent; margin-top: 1; }
ChatScreen .note { color: $text-muted; }
ChatScreen Input.-invalid { border: tall $error; }
"""
# the sampling fields: widget id, the name the operator sees, the Sampling field, its type, default
SAMPLING_FIELDS = (("temperature", "temperature", "temperature", float, 0.7),
                   ("max-tokens", "max tokens", "max_tokens", int, 256))


class Pane:
    """One artifact's side of the screen: its name, conversation and scroll area."""

    def __init__(self, box: VerticalScroll) -> None:
        self.box = box
        self.name: str | None = None
        self.messages: list[dict[str, str]] = []

    def add(self, text: str, classes: str = "") -> Static:
        line = Static(text, classes=classes, markup=False)
        self.box.mount(line)
        self.box.scroll_end(animate=False)
        return line


class ChatScreen(ApplianceScreen):
    MODE = "chat"
    SUB_TITLE = "Chat"
    AUTO_FOCUS = "#prompt"  # typing is what this screen is for (escape, then 1-9, leaves it)
    DEFAULT_CSS = CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        *ApplianceScreen.BINDINGS,
        Binding("ctrl+t", "stop", "Stop the answer"),
        Binding("ctrl+r", "reset", "New conversation"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.engines: dict[str, Any] = {}
        self.cancel = threading.Event()
        self.busy = False
        self.offered: list[tuple[str, str]] | None = None  # the artifacts the selects offer
        self.chosen: tuple[object, object] | None = None  # (artifact, compare) of the conversation

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="settings"):
            yield NamedSelect([], prompt="artifact", id="artifact", allow_blank=True,
                              field_name="artifact")
            yield NamedSelect([], prompt="compare with", id="compare", allow_blank=True,
                              field_name="compare with (optional)")
        with Horizontal(classes="settings"):
            yield Input(placeholder="system prompt (optional)", id="system")
            yield named(Input("0.7", placeholder="temp", id="temperature"), "temp")
            yield named(Input("256", placeholder="max tokens", id="max-tokens"), "max tok")
            yield TickBox("allow failed", id="allow-failed")
        with Horizontal(classes="panes"):
            yield VerticalScroll(classes="pane", id="pane-a")
            yield VerticalScroll(classes="pane", id="pane-b")
        yield Input(placeholder="type a message; Enter sends, ctrl+t stops, ctrl+r starts over",
                    id="prompt")

    def on_mount(self) -> None:
        self.panes = {"a": Pane(self.query_one("#pane-a", VerticalScroll)),
                      "b": Pane(self.query_one("#pane-b", VerticalScroll))}
        self.query_one("#pane-b").display = False

    # -- the artifacts -----------------------------------------------------------------------
    def reload(self) -> None:
        ws = self.ws

        def read() -> list[tuple[str, str]]:
            if not ws.exists():
                return []
            rows = []
            records = sorted(ws.list("export"), key=lambda r: (r.status == "failed", r.name))
            for record in records:
                fmt = record.summary.get("format")
                if fmt in ("gguf", "onnx"):
                    failed = record.status == "failed"
                    rows.append((record.name + (" (parity FAIL)" if failed else ""), record.name))
            return rows

        self.background(read, self._show_artifacts, group="artifacts")

    def _show_artifacts(self, rows: list[tuple[str, str]]) -> None:
        if rows == self.offered:
            return  # unchanged: the selects (and the conversation) are left alone
        self.offered = rows
        for widget_id in ("#artifact", "#compare"):
            select = self.query_one(widget_id, Select)
            keep = select.value
            select.set_options(rows)
            if keep in {v for _, v in rows}:
                select.value = keep
        first = self.query_one("#artifact", Select)
        if rows and first.is_blank():
            first.value = rows[0][1]
        if not rows and not self.panes["a"].box.children:
            self.panes["a"].add("No GGUF or ONNX exports yet: export a run first (6 Exports).", "note")

    @on(Select.Changed)
    def _chosen(self) -> None:
        """Another artifact: a new conversation. The same pair again (options re-set by a
        refresh, a select opened and closed): nothing changes."""
        artifact, compare = self.query_one("#artifact", Select), self.query_one("#compare", Select)
        self.query_one("#pane-b").display = not compare.is_blank()
        pair = (artifact.value, compare.value)
        if pair != self.chosen:
            self.chosen = pair
            self.action_reset()

    # -- talking -----------------------------------------------------------------------------
    @on(Input.Submitted, "#prompt")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.busy:
            return
        targets = self._targets()
        if not targets:
            self.app.notify("pick an artifact first", title="No artifact", severity="warning")
            return
        try:
            sampling = self._sampling()
        except ValueError as exc:
            self.app.notify(str(exc), title="Sampling settings", severity="error",
                                  markup=False)
            return
        event.input.value = ""
        system = self.query_one("#system", Input).value.strip()
        allow = self.query_one("#allow-failed", Checkbox).value
        for key, name in targets:
            pane = self.panes[key]
            pane.name = name
            pane.messages.append({"role": "user", "content": text})
            pane.add(f"you> {text}", "user")
        self.busy = True
        self.cancel.clear()
        self._generate(targets, system, sampling, allow)

    def _targets(self) -> list[tuple[str, str]]:
        out = []
        for key, widget_id in (("a", "#artifact"), ("b", "#compare")):
            select = self.query_one(widget_id, Select)
            if not select.is_blank():
                out.append((key, str(select.value)))
        return out

    def _sampling(self) -> Any:
        """The sampling settings from their fields; ValueError naming the first bad field, what
        was typed and what is allowed (the engine's own rules, `Sampling.validated`)."""
        from appliance.errors import ValidationError
        from appliance.runtime.engine import Sampling

        values: dict[str, Any] = {}
        for widget_id, label, name, kind, default in SAMPLING_FIELDS:
            box = self.query_one(f"#{widget_id}", Input)
            text = box.value.strip()
            try:
                value: Any = kind(text) if text else default
            except ValueError:
                value = text  # not a number: the validator says so, with the allowed range
            try:
                values[name] = getattr(Sampling(**{name: value}).validated(), name)
            except ValidationError as exc:
                box.add_class("-invalid")
                allowed = (exc.hint or "").split(": ", 1)[-1]
                raise ValueError(f"{label}: {exc.message}" + (f"; allowed: {allowed}" if allowed
                                                              else "")) from None
            box.remove_class("-invalid")
        return Sampling(**values).validated()

    @on(Input.Changed, "#temperature, #max-tokens")
    def _sampling_edited(self, event: Input.Changed) -> None:
        event.input.remove_class("-invalid")

    def _generate(self, targets: list[tuple[str, str]], system: str, sampling: Any, allow: bool) -> None:
        app = self.app

        def run() -> None:
            try:
                for key, name in targets:
                    if self.cancel.is_set():
                        break
                    pane = self.panes[key]
                    opened = name in self.engines
                    engine = self._engine(name, allow)
                    if not opened:
                        where = "the GPU" if getattr(engine, "gpu", False) else "the CPU"
                        app.call_from_thread(pane.add, f"{name} opened on {where}", "note")
                    self._answer(pane, engine, system, sampling)
            finally:
                app.call_from_thread(self._idle)

        self.background(run, group="generate", title="The chat failed", modal=True)

    def _idle(self) -> None:
        self.busy = False

    def _engine(self, name: str, allow: bool) -> Any:
        from appliance.runtime import engines

        if name not in self.engines:
            artifact = engines.resolve(name, self.ws, allow_failed_parity=allow)
            self.engines[name] = engines.open_engine(artifact)
        return self.engines[name]

    def _answer(self, pane: Pane, engine: Any, system: str, sampling: Any) -> None:
        from appliance.runtime.engine import Delta, Done

        app = self.app
        messages = ([{"role": "system", "content": system}] if system else []) + pane.messages
        line = app.call_from_thread(pane.add, f"{pane.name}> ")
        parts: list[str] = []
        reason = "cancelled"
        for item in engine.generate(messages, sampling, self.cancel):
            if isinstance(item, Delta) and item.text:
                parts.append(item.text)
                app.call_from_thread(line.update, f"{pane.name}> {''.join(parts)}")
            elif isinstance(item, Done):
                reason = item.reason
                note = {"cancelled": "[stopped]", "length": "[max tokens reached]"}.get(reason, "")
                app.call_from_thread(pane.add, f"{item.completion_tokens} tokens {note}".strip(), "note")
        pane.messages.append({"role": "assistant", "content": "".join(parts)})

    def action_stop(self) -> None:
        self.cancel.set()

    def action_reset(self) -> None:
        if self.busy:
            self.cancel.set()
        for pane in getattr(self, "panes", {}).values():
            pane.messages.clear()
            pane.box.remove_children()

    def on_unmount(self) -> None:
        self.cancel.set()
        if not self.busy:  # a generating engine is left to its thread, which stops at once
            for engine in self.engines.values():
                engine.close()
