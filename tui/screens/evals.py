"""Eval: did the fine-tune help? The evaluations in the workspace, each one's targets side by side
with their deltas to the base (the first target), a bar chart of those deltas, and its items, any
of which opens with its prompt, its reference and the answers of the base and a chosen target.

An evaluation is the `eval` stage's artifact (`evals/<name>/`): `eval.json` (per target: totals,
deltas to the first target, flips and every item's answer and scores) and `items.jsonl` (each
item's prompt messages and reference, in the same order). This screen only reads them (in a
worker, when an eval is selected); the metric names and which of them are fractions shown as
percentages, and how a value or delta is written, are the stage's own (`results.TABLE_METRICS`,
`results.scale`, `format_value`, `format_delta`: the CLI's table and this screen agree), imported from
`appliance.stages.eval.results`, which loads nothing but the standard library.

The items table has one row per item: the prompt's first line, one metric (chrF first; `m` cycles
chrF, ROUGE-L, BLEU) per target, and the chosen target's delta to the base (`t` cycles the target).
`s` cycles the order: as evaluated, worst regressions first, best first. `n` starts a new
evaluation (a job, through the door, as `appliance eval` does); it goes on if the UI closes. Its
form offers the workspace's GGUF exports as a judge; an eval with a judge shows its verdict counts
under the flips (`results.judge_line`, the CLI's words) and each item's verdict above the target's
answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.coordinate import Coordinate
from textual.screen import ModalScreen
from textual.widgets import DataTable, Input, Select, SelectionList, Static

from appliance import api
from appliance.stages.eval.request import (
    DEFAULT_LIMIT,
    DEFAULT_MAX_NEW_TOKENS,
    TARGET_KINDS,
    EvalRequest,
)
from appliance.stages.eval.results import (
    TABLE_METRICS,
    format_delta,
    format_value,
    judge_line,
    scale,
)
from appliance.workspace import ArtifactRecord, Workspace
from tui.dialogs import FormDialog, NamedSelect, dialog_css, named
from tui.screens.base import ArtifactScreen, record_names
from tui.widgets import KeyedTable, TickList, clip, middle

ITEM_METRICS = ("chrf", "rougeL", "bleu")  # the items table's metric, cycled by `m`
CHART_METRICS = ("rougeL", "bleu", "chrf", "exact", "contains")  # all in points (0-100)
METRIC_NAMES = {"ppl": "ppl", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "bleu": "BLEU", "chrf": "chrF", "exact": "exact", "contains": "contains",
                "tokens": "tokens"}
ORDERS = ("item", "worst", "best")  # as evaluated; delta ascending; delta descending
ORDER_NAMES = {"item": "as evaluated", "worst": "worst first", "best": "best first"}
CHART_HALF = 12  # cells each side of the chart's zero line
NAME_WIDTH = 14  # a target's column heading (names differ at their ends: `middle`)
LEFT_WIDTH = 64  # on a wide screen (the app's `-wide` breakpoint) the report's column, the items beside


@dataclass(frozen=True)
class EvalView:
    """One evaluation as the stage wrote it: `report` is eval.json, `items` items.jsonl."""

    name: str
    report: dict[str, Any]
    items: list[dict[str, Any]]

    @property
    def targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.report["targets"]
        return targets

    def score(self, target: int, item: int, metric: str) -> float:
        """An item's score in points (ROUGE and exact/contains are 0-1 in the file)."""
        value = float(self.targets[target]["items"][item]["scores"][metric])
        return value * scale(metric)

    def delta(self, target: int, item: int, metric: str) -> float:
        return self.score(target, item, metric) - self.score(0, item, metric)

    def prompt(self, item: int) -> str:
        """The item's last prompt turn (what was asked), or '' if items.jsonl lacks it."""
        if item >= len(self.items):
            return ""
        messages = self.items[item].get("messages") or [{}]
        return str(messages[-1].get("content", ""))


def read_eval(path: Path) -> EvalView:
    """An eval artifact's eval.json and items.jsonl (runs in a worker)."""
    report = json.loads((path / "eval.json").read_text(encoding="utf-8"))
    items_file = path / "items.jsonl"
    items = [json.loads(line) for line in items_file.read_text(encoding="utf-8").splitlines()
             if line.strip()] if items_file.exists() else []
    return EvalView(path.name, report, items)


def metric_cell(metric: str, value: float | None, delta: float | None = None) -> Text:
    """`41.2 (+3.1)` as the CLI's table writes it (`results.format_value`/`format_delta`), the
    delta coloured: better green, worse red (lower perplexity is better)."""
    if value is None:
        return Text("-", style="dim")
    text = Text(format_value(metric, value))
    if delta is not None:
        written = format_delta(metric, delta)
        better = -delta if metric == "ppl" else delta
        style = "" if metric == "tokens" or float(written) == 0 else "green" if better > 0 else "red"
        text.append(f" ({written})", style=style)
    return text


def totals_table(view: EvalView) -> Table:
    """Metrics down, targets across (side by side), each cell its total and its delta to the
    base; the runtime above, how many answers stopped on their own below."""
    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    table.add_column("metric", no_wrap=True)
    for target in view.targets:
        table.add_column(middle(target["name"], NAME_WIDTH), justify="right", no_wrap=True)
    table.add_row("runtime", *(Text(middle(str(t.get("runtime", "?")), NAME_WIDTH), style="dim")
                               for t in view.targets))
    for metric in TABLE_METRICS:
        table.add_row(METRIC_NAMES.get(metric, metric), *(
            metric_cell(metric, t["totals"].get(metric), None if i == 0 else t["deltas"].get(metric))
            for i, t in enumerate(view.targets)))
    table.add_row("stopped", *(f"{t.get('stopped', 0)}/{view.report['items']}" for t in view.targets))
    return table


def chart_bar(delta: float, top: float, half: int = CHART_HALF) -> Text:
    """A bar either side of a zero line: `   ▇▇▇│` below zero (red), `│▇▇▇   ` above (green)."""
    cells = min(half, round(abs(delta) / top * half)) if top else 0
    if cells == 0 and abs(delta) >= 0.05:
        cells = 1  # a change too small to scale still shows
    left = ("▇" * cells).rjust(half) if delta < 0 else " " * half
    right = ("▇" * cells).ljust(half) if delta > 0 else " " * half
    return Text.assemble((left, "red"), ("│", "dim"), (right, "green"))


def delta_chart(view: EvalView) -> Text:
    """Per target after the base, each metric's delta as a bar with its signed number beside it
    (the sign, not the colour, says better or worse), all on one scale of points."""
    deltas = [(t["name"], [(m, (t["deltas"].get(m) or 0.0) * scale(m)) for m in CHART_METRICS])
              for t in view.targets[1:]]
    if not deltas:
        return Text("one target: no deltas to chart (the first target is the base)", style="dim")
    top = max((abs(d) for _, row in deltas for _, d in row), default=0.0) or 1.0
    text = Text(f"Δ to the base in points (bars to ±{top:.1f})", style="bold")
    for name, row in deltas:
        text.append(f"\n{name}")
        for metric, delta in row:
            text.append(f"\n  {METRIC_NAMES[metric]:<8} ")
            text.append_text(chart_bar(delta, top))
            text.append(f" {delta:+6.1f}")
    return text


def flips_text(view: EvalView) -> Text:
    """Items that moved past the stage's thresholds, per target: what an average hides."""
    text = Text()
    for t in view.targets[1:]:
        moved = [(m, f) for m, f in t.get("flips", {}).items() if f["better"] or f["worse"]]
        line = "; ".join(f"{METRIC_NAMES.get(m, m)} +{len(f['better'])}/-{len(f['worse'])}"
                         for m, f in moved) or "no item moved past a threshold"
        text.append(f"\nflips {t['name']}: {line}")
    return text


def judge_text(view: EvalView) -> Text:
    """The judge's verdict counts per target, as the CLI writes them (`results.judge_line`);
    empty without a judge."""
    judge = view.report.get("settings", {}).get("judge")
    text = Text()
    if not judge:
        return text
    text.append(f"\njudge {judge.get('name', '?')} (each item asked twice, A and B swapped)",
                style="bold")
    for t in view.targets[1:]:
        if "judge" in t:
            text.append(f"\n{judge_line(view.targets[0]['name'], t)}")
    return text


VERDICTS = {"win": ("better than the base", "green"), "loss": ("worse than the base", "red"),
            "tie": ("a tie", ""), "inconsistent": ("the two orders disagree", "yellow"),
            "skipped": ("not asked: too long for the judge", "dim")}


def verdict_text(row: dict[str, Any]) -> Text:
    """An item's judge verdict for a target (empty without one)."""
    verdict = row.get("judge")
    if not verdict:
        return Text()
    words, style = VERDICTS.get(verdict.get("verdict", ""), (str(verdict.get("verdict")), ""))
    return Text.assemble(("judge: ", "dim"), (words, style))


def report_body(view: EvalView) -> Group:
    """What was evaluated, the totals table, the flips, the judge's verdicts, then the delta
    chart."""
    report, settings = view.report, view.report.get("settings", {})
    head = Text(f"{report['items']} items of {report.get('data', {}).get('name', '?')} · base "
                f"{view.targets[0]['name']} · greedy, ≤{settings.get('max_new_tokens', '?')} new "
                "tokens")
    units = Text("ROUGE, exact, contains in %; BLEU, chrF 0-100; (Δ to the base)", style="dim")
    return Group(head, totals_table(view), units, flips_text(view), judge_text(view), Text(""),
                 delta_chart(view))


def item_order(view: EvalView, target: int, metric: str, order: str) -> list[int]:
    """Item indexes in the order asked: as evaluated, worst delta first, or best first (ties keep
    the evaluation's order)."""
    indexes = list(range(view.report["items"]))
    if order == "item" or target == 0:
        return indexes
    return sorted(indexes, key=lambda i: view.delta(target, i, metric), reverse=order == "best")


def column_labels(targets: int) -> list[str]:
    """The items table's score columns: `base`, then `T1`, `T2`... (the heading names them)."""
    return ["base", *(f"T{i}" for i in range(1, targets))]


def items_heading(view: EvalView, target: int, metric: str, order: str) -> str:
    """What the items table's columns are: the metric, which target each `Tn` is, what Δ is."""
    labels = column_labels(len(view.targets))
    parts = [f"{METRIC_NAMES[metric]} per item (m)",
             *(f"{label} {t['name']}" for label, t in zip(labels[1:], view.targets[1:], strict=True)),
             f"Δ = {labels[target]} − base (t)" if target else "no Δ: one target",
             f"{ORDER_NAMES[order]} (s)"]
    return " · ".join(parts)


def delta_text(delta: float | None) -> Text:
    if delta is None:
        return Text("-", style="dim", justify="right")
    style = "green" if round(delta, 1) > 0 else "red" if round(delta, 1) < 0 else ""
    return Text(f"{delta:+.1f}", style=style, justify="right")


def item_rows(view: EvalView, target: int, metric: str, order: str, prompt_width: int
              ) -> list[tuple[str, tuple[object, ...]]]:
    """The items table: #, the prompt's first line, the metric per target, the chosen target's
    delta to the base."""
    rows: list[tuple[str, tuple[object, ...]]] = []
    for i in item_order(view, target, metric, order):
        first = (view.prompt(i).strip().splitlines() or [""])[0]
        scores = (Text(f"{view.score(t, i, metric):.1f}", justify="right")
                  for t in range(len(view.targets)))
        rows.append((str(i), (str(i), clip(first, prompt_width), *scores,
                              delta_text(view.delta(target, i, metric) if target else None))))
    return rows


# -- one item: prompt, reference and two answers ----------------------------------------------
def answer_text(view: EvalView, target: int, item: int, metric: str) -> Text:
    row = view.targets[target]["items"][item]
    head = Text(view.targets[target]["name"] + (" (base)" if target == 0 else ""), style="bold")
    note = f"  {METRIC_NAMES[metric]} {view.score(target, item, metric):.1f}"
    if target:
        note += f" ({view.delta(target, item, metric):+.1f})"
    head.append(f"{note}, {row.get('tokens', '?')} tokens, {row.get('reason', '?')}", style="dim")
    verdict = verdict_text(row)
    return Text.assemble(head, *(("\n", verdict) if verdict else ()), "\n", row.get("answer", ""))


def prompt_text(view: EvalView, item: int) -> Text:
    """Every turn of the prompt, each headed by its role."""
    messages = view.items[item].get("messages", []) if item < len(view.items) else []
    text = Text("prompt", style="bold")
    for m in messages:
        text.append(f"\n{m.get('role', '?')}: ", style="dim")
        text.append(str(m.get("content", "")))
    return text


def reference_text(view: EvalView, item: int) -> Text:
    reference = str(view.items[item].get("reference", "")) if item < len(view.items) else ""
    return Text.assemble(("reference", "bold"), "\n", reference)


class ItemView(ModalScreen[None]):
    """One item: its prompt and reference, then the base's answer and the chosen target's, side by
    side when the terminal is wide, one above the other when not. `n`/`p` step through the items
    in the table's order."""

    HELP_TITLE = "an eval item"
    DEFAULT_CSS = """
    ItemView { align: center middle; }
    ItemView > VerticalScroll {
        width: 100%; height: 100%; border: thick $primary; background: $surface; padding: 0 1;
    }
    ItemView #item-title { text-style: bold; color: $accent; }
    ItemView .part { height: auto; margin-top: 1; }
    ItemView .split { height: auto; margin-top: 1; }
    ItemView.-wide .answer { width: 1fr; }
    ItemView.-wide #answer-base { margin-right: 2; }
    ItemView.-narrow #answer-target { margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q", "close", "Close"),
        Binding("n", "step(1)", "Next item"),
        Binding("p", "step(-1)", "Previous item"),
    ]

    def __init__(self, view: EvalView, order: list[int], at: int, target: int, metric: str) -> None:
        super().__init__()
        self.view, self.order, self.at, self.target, self.metric = view, order, at, target, metric

    @property
    def item(self) -> int:
        return self.order[self.at]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("", id="item-title")
            yield Static("", id="prompt", classes="part")
            yield Static("", id="reference", classes="part")
            with Horizontal(classes="split"):
                yield Static("", id="answer-base", classes="answer")
                yield Static("", id="answer-target", classes="answer")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()
        self._fill()

    def _fill(self) -> None:
        view, item = self.view, self.item
        self.query_one("#item-title", Static).update(
            f"{view.name}: item {item} ({self.at + 1} of {len(self.order)} in the table's order; "
            "n / p step, esc closes)")
        self.query_one("#prompt", Static).update(prompt_text(view, item))
        self.query_one("#reference", Static).update(reference_text(view, item))
        self.query_one("#answer-base", Static).update(answer_text(view, 0, item, self.metric))
        target = self.query_one("#answer-target", Static)
        target.display = self.target != 0
        if self.target:
            target.update(answer_text(view, self.target, item, self.metric))
        self.query_one(VerticalScroll).scroll_home(animate=False)

    def action_step(self, by: int) -> None:
        self.at = (self.at + by) % len(self.order)
        self._fill()

    def action_close(self) -> None:
        self.dismiss(None)


# -- a new evaluation ---------------------------------------------------------------------------
def target_choices(ws: Workspace) -> list[tuple[str, str]]:
    """(label, target name) for every model, run and export, by name within each kind (the
    workspace lists by creation time, which ties within a second); a name two kinds share is
    written KIND:NAME, as `appliance eval` takes it."""
    found = [(kind, name) for kind in TARGET_KINDS for name in sorted(record_names(ws, kind))]
    names = [name for _, name in found]
    return [(f"{kind:<6} {name}", name if names.count(name) == 1 else f"{kind}:{name}")
            for kind, name in found]


@dataclass(frozen=True)
class Choices:
    targets: list[tuple[str, str]]
    datasets: list[str]
    judges: list[str]  # GGUF exports (a .gguf file as judge: `appliance eval --judge FILE`)


def judge_choices(ws: Workspace) -> list[str]:
    """The GGUF exports whose parity gate did not fail, by name."""
    if not ws.exists():
        return []
    return sorted(r.name for r in ws.list("export")
                  if r.summary.get("format") == "gguf" and r.status != "failed")


def read_choices(ws: Workspace) -> Choices:
    return Choices(target_choices(ws), record_names(ws, "dataset"), judge_choices(ws))


class EvalDialog(FormDialog[EvalRequest]):
    """Targets (the first ticked is the base), the held-out data, how many items and how long an
    answer may be: an `EvalRequest`, checked before the form closes."""

    HELP_TITLE = "start an evaluation"
    DEFAULT_CSS = dialog_css("EvalDialog") + """
    EvalDialog SelectionList { height: auto; max-height: 6; }  /* room for a problem line at 80x24 */
    EvalDialog .row { height: auto; }
    EvalDialog .row Input { width: 1fr; }
    """
    HEADING = "Evaluate: tick the targets, the base first (compared with the rest)"
    SUBMIT = "Evaluate"
    FIELDS: ClassVar[dict[str, str]] = {"max_new_tokens": "#max_new_tokens"}

    def __init__(self, choices: Choices) -> None:
        super().__init__()
        self.choices = choices

    def compose_fields(self) -> ComposeResult:
        yield named(TickList(*[(label, value, False) for label, value in self.choices.targets],
                             id="targets"), "targets, in the order ticked")
        yield NamedSelect([("the held-out split of the targets' own dataset", ""),
                           *((f"dataset {d} (its held-out split)", d) for d in self.choices.datasets)],
                          value="", allow_blank=False, id="data", field_name="data")
        with Horizontal(classes="row"):
            yield named(Input(str(DEFAULT_LIMIT), id="limit"), "items")
            yield named(Input(str(DEFAULT_MAX_NEW_TOKENS), id="max_new_tokens"), "max new tokens")
            yield named(Input(placeholder="default eval-JOB", id="name"), "name")
        yield NamedSelect([("no judge", ""), *((f"judge {j} (compares each target with the base)", j)
                                               for j in self.choices.judges)],
                          value="", allow_blank=False, id="judge", field_name="judge")

    def submit(self) -> None:
        numbers: dict[str, int] = {}
        for field in ("limit", "max_new_tokens"):
            text = self.query_one(f"#{field}", Input).value.strip()
            if not text.isdigit():
                self.show_problems({field: f"a whole number, got {text!r}"})
                return
            numbers[field] = int(text)
        request = EvalRequest(tuple(self.query_one("#targets", SelectionList).selected),
                              str(self.query_one("#data", Select).value),
                              limit=numbers["limit"], max_new_tokens=numbers["max_new_tokens"],
                              name=self.query_one("#name", Input).value.strip() or None,
                              judge=str(self.query_one("#judge", Select).value))
        self.dismiss_checked(request, request.problems)


# -- the screen -------------------------------------------------------------------------------
class EvalsScreen(ArtifactScreen):
    MODE = "evals"
    SUB_TITLE = "Eval"
    JOB_KINDS = ("eval",)
    FULL_PROFILE_ACTIONS: ClassVar[dict[str, str]] = {"new": "eval"}
    DEFAULT_CSS = f"""
    EvalsScreen #left {{ height: 3fr; }}
    EvalsScreen #right {{ height: 2fr; }}
    EvalsScreen.-wide #left {{ width: {LEFT_WIDTH}; height: 1fr; }}
    EvalsScreen.-wide #right {{ width: 1fr; height: 1fr; }}
    EvalsScreen #evals {{ height: auto; max-height: 5; }}
    EvalsScreen #report-box {{ height: 1fr; border: round $panel; padding: 0 1; }}
    EvalsScreen #items-head {{ height: auto; max-height: 3; padding: 0 1; color: $text-muted; }}
    EvalsScreen #items {{ height: 1fr; max-height: 100%; }}
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "open_item", "Answers"),
        Binding("s", "sort", "Sort"),
        Binding("t", "target", "Target of Δ", show=False),  # the items heading says (t), (m)
        Binding("m", "metric", "Metric of the items", show=False),
        Binding("n", "new", "New…"),
        Binding("x,delete", "delete", "Delete"),
    ]

    KIND = "eval"
    DETAILS_ID = "report"
    COLUMNS = ("eval", "targets", "items")
    ROW_ACTIONS = ("delete", "open_item", "sort", "target", "metric")
    EMPTY = ("No evaluations yet.\n\n"
             "  n  evaluates targets (a model, a run, its exports) on held-out chats;\n"
             "     the first ticked is the base the others are compared with. Or:\n"
             "     appliance eval BASE TARGET... [--limit N] [--max-new-tokens N]")
    DELETE_NOTE = "The eval's report, answers and items are removed (the targets stay)."

    def __init__(self) -> None:
        super().__init__()
        self.view: EvalView | None = None  # the selected eval, once read
        self.target = 1  # the target whose delta the items table shows (0 is the base)
        self.metric = ITEM_METRICS[0]
        self.order = ORDERS[0]

    def compose_body(self) -> ComposeResult:
        with Horizontal(classes="split"):
            with Vertical(id="left"):
                yield KeyedTable(*self.COLUMNS, id=self.table_id)
                with VerticalScroll(id="report-box"):
                    yield Static("reading…", id=self.DETAILS_ID)
            with Vertical(id="right"):
                yield Static("", id="items-head")
                yield KeyedTable("#", "prompt", id="items")
        yield Static("", id="activity")

    def row(self, record: ArtifactRecord) -> tuple[Any, ...]:
        targets = record.summary.get("targets", [])
        return (middle(record.name, 22), clip(", ".join(targets), 28), record.summary.get("items", "?"))

    def reload(self) -> None:
        self.view = None  # read the selected eval again too
        super().reload()

    # -- the selected eval ---------------------------------------------------------------------
    def _details(self) -> None:
        name, ws = self.selected(), self.ws
        if name is None:
            self.view = None
            self._show_items()
            if self.query_one(f"#{self.table_id}", KeyedTable).total:
                self.query_one(f"#{self.DETAILS_ID}", Static).update(
                    "no eval matches the filter (escape clears it)")
            return
        if self.view is not None and self.view.name == name:
            return  # the items table moved, not the eval
        self.background(lambda: read_eval(ws.artifact_dir("eval", name)), self._show_eval,
                        group="eval")

    def _show_eval(self, view: EvalView) -> None:
        if view.name != self.selected():
            return  # the selection moved on meanwhile
        if self.view is None or self.view.name != view.name:
            self.target = 1 if len(view.targets) > 1 else 0
        self.view = view
        self.query_one(f"#{self.DETAILS_ID}", Static).update(report_body(view))
        self._show_items()
        self.refresh_bindings()

    def _show_items(self) -> None:
        table, head = self.query_one("#items", KeyedTable), self.query_one("#items-head", Static)
        view = self.view
        if view is None:
            table.fill([])
            head.update("")
            return
        labels = column_labels(len(view.targets))
        table.set_columns("#", "prompt", *labels, "Δ")
        fixed = 3 + 2 + 7 * len(labels) + 7 + 3  # #, the prompt's padding, scores, Δ, scrollbar
        # from the screen's width: the pane's own lags a resize by a layout
        width = self.app.size.width - (LEFT_WIDTH if self.has_class("-wide") else 0)
        table.fill(item_rows(view, self.target, self.metric, self.order, max(12, width - fixed)))
        head.update(items_heading(view, self.target, self.metric, self.order))

    def on_resize(self) -> None:
        if self.view is not None:
            self.call_after_refresh(self._show_items)  # the prompt column follows the width

    # -- actions -------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("open_item", "sort", "metric") and self.view is None:
            return None
        if action == "target" and (self.view is None or len(self.view.targets) < 3):
            return None  # greyed out: no other target to choose
        return super().check_action(action, parameters)

    def action_sort(self) -> None:
        self.order = ORDERS[(ORDERS.index(self.order) + 1) % len(ORDERS)]
        self._show_items()
        self.query_one("#items", KeyedTable).move_cursor(row=0, animate=False)

    def action_target(self) -> None:
        if self.view is not None and len(self.view.targets) > 1:
            self.target = self.target % (len(self.view.targets) - 1) + 1
            self._show_items()

    def action_metric(self) -> None:
        self.metric = ITEM_METRICS[(ITEM_METRICS.index(self.metric) + 1) % len(ITEM_METRICS)]
        self._show_items()

    def shown_order(self) -> list[int]:
        """The item indexes as the items table shows them now (sorted, filtered)."""
        table = self.query_one("#items", KeyedTable)
        return [int(table.coordinate_to_cell_key(Coordinate(r, 0)).row_key.value or 0)
                for r in range(table.row_count)]

    def action_open_item(self) -> None:
        view, table = self.view, self.query_one("#items", KeyedTable)
        key = table.selected_key()
        if view is None or key is None:
            return
        order = self.shown_order()
        self.app.push_screen(ItemView(view, order, order.index(int(key)), self.target, self.metric))

    @on(DataTable.RowSelected, "#items")
    def _item_chosen(self) -> None:
        self.action_open_item()

    @on(DataTable.RowSelected, "#evals")
    def _eval_chosen(self) -> None:
        self.query_one("#items", KeyedTable).focus()

    def action_new(self) -> None:
        ws = self.ws

        def ask(choices: Choices) -> None:
            if not choices.targets:
                self.notify("nothing to evaluate yet: import a model first (2 Models)",
                            title="No targets", severity="warning")
                return
            self.app.push_screen(EvalDialog(choices), self._start)

        self.background(lambda: read_choices(ws), ask, group="choices")

    def _start(self, request: EvalRequest | None) -> None:
        if request is None:
            return
        ws = self.ws
        self.background(lambda: api.start_request(ws, request), self.job_started,
                        group="start", title="Could not start the evaluation", modal=True)

    def deleted(self, name: str) -> None:
        self.view = None
        super().deleted(name)


DIALOGS = (EvalDialog, ItemView)
