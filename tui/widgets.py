"""Widgets every screen shares: the navigation bar, a braille line chart, text bars and histograms.

The chart draws only when it is told its data changed (`set_series`), and its owner calls that at
most once per poll, so a job emitting events at any rate costs the UI a bounded number of redraws.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from rich.segment import Segment
from rich.text import Text
from textual import events
from textual.app import RenderResult
from textual.binding import Binding, BindingType
from textual.content import Content
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Checkbox, DataTable, SelectionList, Static

BRAILLE = 0x2800
DOT = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # DOT[row][column] in one cell
LABEL_WIDTH = 8
Point = tuple[float, float]


class NavBar(Static):
    """`1 Dashboard  2 Models ...`: the screens and their keys, the current one highlighted.

    While a text box has focus the digits type into it, so the bar then reads
    `alt+ 1 Dashboard 2 Models ...`: the keys that switch screens now. The bar takes the widest
    form that fits its width: two spaces between the screens, else one, else one and the short
    titles (`Dash`, `Data`): nine screens with `alt+` need that at 80 columns."""

    DEFAULT_CSS = "NavBar { height: 1; background: $panel; color: $text-muted; }"

    def __init__(self, items: Sequence[tuple[str, str, str, str]], current: str) -> None:
        super().__init__(self._markup(items, current, typing=False, width=None), markup=True)
        self.items, self.current, self.typing = list(items), current, False

    def set_typing(self, typing: bool) -> None:
        if typing != self.typing:
            self.typing = typing
            self._redraw()

    def on_resize(self) -> None:
        self._redraw()

    def _redraw(self) -> None:
        self.update(self._markup(self.items, self.current, typing=self.typing,
                                 width=self.size.width or None))

    @staticmethod
    def _markup(items: Sequence[tuple[str, str, str, str]], current: str, *, typing: bool,
                width: int | None) -> str:
        prefix, room = (" [b $accent]alt+[/] ", 6) if typing else (" ", 1)
        forms = [("  ", False), (" ", False), (" ", True)]
        if typing:  # the prefix takes the room of the double spaces at 80 columns
            forms = forms[1:]
        for separator, short in forms:
            titles = [(key, mode, nav if short else title) for key, mode, title, nav in items]
            plain = room + len(separator.join(f"{key} {title}" for key, _, title in titles))
            if width is None or plain <= width:
                break
        parts = []
        for key, mode, title in titles:
            style = "reverse bold" if mode == current else ""
            label = f"[b $accent]{key}[/] {title}" if mode != current else f"{key} {title}"
            text = f"[@click=app.switch_mode('{mode}')]{label}[/]"
            parts.append(f"[{style}]{text}[/]" if style else text)
        return prefix + separator.join(parts)


def rate(value: float) -> str:
    """A rate for people: one decimal below 10 (`3.4` tok/s on a CPU, not `3`), whole above."""
    return f"{value:.1f}" if round(value, 1) < 10 else f"{value:.0f}"


class TickBox(Checkbox):
    """A checkbox that reads `[X]` ticked and `[ ]` not, so it shows without colour (Textual's
    draws an X either way and tells them apart by colour only)."""

    BUTTON_LEFT, BUTTON_RIGHT = "[", "]"

    @property
    def _button(self) -> Content:
        return Content.assemble("[", ("X" if self.value else " ", "bold"), "]")


class TickList(SelectionList[str]):
    """A selection list whose ticked entries read `[X]` and the others `[ ]` (not colour alone)."""

    def render_line(self, y: int) -> Strip:
        line = super().render_line(y)
        segments = list(line)
        index = self.scroll_offset[1] + y
        if len(segments) < 3 or not 0 <= index < self.option_count:
            return line
        ticked = self.get_option_at_index(index).value in self._selected
        inner = segments[1]
        segments[:3] = [Segment("[", inner.style), Segment("X" if ticked else " ", inner.style),
                        Segment("]", inner.style)]
        return Strip(segments, line.cell_length)


def bar(fraction: float, width: int = 10) -> str:
    """A text gauge: `███▌░░░░░░`."""
    fraction = min(max(fraction, 0.0), 1.0)
    full, part = divmod(round(fraction * width * 2), 2)
    return ("█" * full + ("▌" if part else "")).ljust(width, "░")


def histogram_lines(bins: Sequence[dict], width: int = 30) -> list[str]:
    """Rows `  from-to  ████ count` for `datasets.length_stats` histogram bins, from the first
    non-empty bin to the last."""
    filled = [i for i, b in enumerate(bins) if b["count"]]
    bins = bins[filled[0]:filled[-1] + 1] if filled else []
    top = max((b["count"] for b in bins), default=0) or 1
    label = max((len(f"{b['from']}-{b['to']}") for b in bins), default=0)
    rows = []
    for b in bins:
        span = f"{b['from']}-{b['to']}"
        rows.append(f"  {span:>{label}} {'█' * round(b['count'] / top * width):<{width}} {b['count']}")
    return rows


def _bucket(points: Sequence[Point], x0: float, x1: float, columns: int) -> list[tuple[int, float]]:
    """At most one point per dot column (the mean of the points that fall in it)."""
    sums: dict[int, list[float]] = {}
    span = (x1 - x0) or 1.0
    for x, y in points:
        column = min(columns - 1, int((x - x0) / span * (columns - 1) + 0.5))
        acc = sums.setdefault(column, [0.0, 0.0])
        acc[0] += y
        acc[1] += 1
    return [(c, acc[0] / acc[1]) for c, acc in sorted(sums.items())]


class LineChart(Widget):
    """Several series on shared axes, drawn with braille dots; y labels on the left."""

    DEFAULT_CSS = "LineChart { height: 8; }"

    def __init__(self, styles: dict[str, str], *, empty: str = "no data yet", id: str | None = None
                 ) -> None:
        super().__init__(id=id)
        self.styles_by_series = styles
        self.series: dict[str, list[Point]] = {name: [] for name in styles}
        self.empty = empty

    def set_series(self, name: str, points: Sequence[Point]) -> None:
        self.series[name] = list(points)
        self.refresh()

    def render(self) -> RenderResult:
        points = [p for s in self.series.values() for p in s]
        width, height = self.size.width - LABEL_WIDTH, self.size.height - 1
        if not points or width < 4 or height < 2:
            return Text(self.empty, style="dim")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        bounds = (min(xs), max(xs), min(ys), max(ys))
        grid = self._plot(width, height, bounds)
        return self._text(grid, width, height, bounds)

    def _plot(self, width: int, height: int, bounds: tuple[float, float, float, float]
              ) -> list[list[tuple[int, str]]]:
        x0, x1, y0, y1 = bounds
        grid = [[(0, "")] * width for _ in range(height)]
        rows = height * 4
        for name, style in self.styles_by_series.items():
            cells = _bucket(self.series[name], x0, x1, width * 2)
            dots = [(c, round((y1 - y) / ((y1 - y0) or 1.0) * (rows - 1))) for c, y in cells]
            for (ca, ra), (cb, rb) in zip(dots, dots[1:] or dots):
                steps = max(abs(cb - ca), abs(rb - ra), 1)
                for i in range(steps + 1):
                    col, row = ca + (cb - ca) * i // steps, ra + (rb - ra) * i // steps
                    code, _ = grid[row // 4][col // 2]
                    grid[row // 4][col // 2] = (code | DOT[row % 4][col % 2], style)
        return grid

    def _text(self, grid: list[list[tuple[int, str]]], width: int, height: int,
              bounds: tuple[float, float, float, float]) -> Text:
        x0, x1, y0, y1 = bounds
        labels = {0: f"{y1:.4g}", height - 1: f"{y0:.4g}", (height - 1) // 2: f"{(y0 + y1) / 2:.4g}"}
        text = Text(no_wrap=True, overflow="crop")
        for r, row in enumerate(grid):
            text.append(f"{labels.get(r, ''):>{LABEL_WIDTH - 1}}┤", style="dim")
            for code, style in row:
                text.append(chr(BRAILLE + code) if code else " ", style=style or None)
            text.append("\n")
        left, right = f"{x0:g}", f"step {x1:g}"
        text.append(" " * LABEL_WIDTH + left + right.rjust(width - len(left)), style="dim")
        return text


class KeyedTable(DataTable):
    """A row-cursor table refilled in place: unchanged data is not redrawn, and the cursor stays on
    the row with the same key when the rows change under it (a poll must not move the selection).

    `set_filter` keeps only the rows with the text in one of their cells (any case); a refill
    keeps the filter, so a poll never brings hidden rows back. `j`/`k`, `g`/`G` move as in vi."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("g", "scroll_top", "First row", show=False),
        Binding("G,shift+g", "scroll_bottom", "Last row", show=False),
    ]

    def __init__(self, *columns: str, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._columns = columns
        self._rows: list[tuple[str, tuple[object, ...]]] | None = None  # the rows shown
        self._all: list[tuple[str, tuple[object, ...]]] = []  # every row given to `fill`
        self.filter_text = ""

    def on_mount(self) -> None:
        self.add_columns(*self._columns)

    async def _on_idle(self, event: events.Idle) -> None:
        """DataTable sizes its columns on idle, but a line it rendered before that (the header,
        drawn while the rows were being added) stays cached at the old widths until the data
        changes again: seen as a header out of line with its rows. Drop those lines once the
        widths are new. (Textual then runs DataTable's own idle handler: nothing left to do.)"""
        resized = self._require_update_dimensions or bool(self._updated_cells)
        await super()._on_idle(event)
        if resized:
            self._clear_caches()
            self.refresh()

    @property
    def total(self) -> int:
        """How many rows there are, filtered out or not."""
        return len(self._all)

    def fill(self, rows: list[tuple[str, tuple[object, ...]]]) -> None:
        self._all = rows
        self._show(self._matching(rows))

    def set_columns(self, *columns: str) -> None:
        """Other columns (a table whose columns depend on what it shows): the rows are dropped,
        to be refilled; nothing happens when the columns are the same."""
        if columns == self._columns:
            return
        self._columns = columns
        self.clear(columns=True)
        self.add_columns(*columns)
        self._rows = None

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self._show(self._matching(self._all))
        if self.row_count:
            self.move_cursor(row=self.cursor_row if self.cursor_row < self.row_count else 0,
                             animate=False)

    def _matching(self, rows: list[tuple[str, tuple[object, ...]]]
                  ) -> list[tuple[str, tuple[object, ...]]]:
        wanted = self.filter_text.casefold()
        if not wanted:
            return rows
        return [(key, cells) for key, cells in rows
                if any(wanted in str(cell).casefold() for cell in (key, *cells))]

    def _show(self, rows: list[tuple[str, tuple[object, ...]]]) -> None:
        if rows == self._rows:
            return
        current = self.selected_key()
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        self._rows = rows
        keys = [k for k, _ in rows]
        if current in keys:
            self.move_cursor(row=keys.index(current), animate=False)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)

    def select_key(self, key: str) -> bool:
        keys = [k for k, _ in self._rows or []]
        if key not in keys:
            return False
        self.move_cursor(row=keys.index(key), animate=False)
        return True


def middle(text: str, width: int) -> str:
    """`text` cut in the middle to fit `width` (names differ at their ends: a run's exports share
    the run's name and end in their type)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head):]}"


def clip(text: str, width: int) -> str:
    """`text` cut at `width` with an ellipsis (a table cell that must not widen its table)."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


ELAPSED_TAIL = re.compile(r"… \d+(?:m\d\ds|h\d\dm)$")  # `… 0m42s`, as `feed.summary_line` ends


def clip_keeping_time(text: str, width: int) -> str:
    """`clip`, but a line that ends in how long something has taken keeps that end: the time is
    what changes, the text before it is cut instead."""
    found = ELAPSED_TAIL.search(text)
    if len(text) <= width or found is None or width <= len(found.group(0)) + 1:
        return clip(text, width)
    return text[:width - len(found.group(0))].rstrip() + found.group(0)


def first_line(text: str, width: int = 80) -> str:
    return text.splitlines()[0][:width] if text else ""
