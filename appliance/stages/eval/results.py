"""An evaluation's results: per-item answers kept as they are made, and what people read.

`ItemLog` is one target's answers, one JSON line per finished item, appended and fsynced as each
item finishes, in the job's folder. A job killed (kill -9, OOM, reboot) and resumed reads it back
and generates only the items it lacks; a line torn by the kill is cut off first. Each line names
its item by a hash of the item's text, so a line never counts for another item.

From the scored items: each target's totals with their deltas to the first target (the base), and
the per-item "flips": items whose score moved past a threshold from the base to a target, so a
regression an average hides is listed by item. With a judge, each target's verdict counts
(`judge_line`) follow. `table` is what the CLI and the demo print; `markdown` the report an auditor
opens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# A flip is a per-item change of at least this much, base -> target (ROUGE 0-1, BLEU/chrF 0-100,
# exact/contains 0 or 1: any change).
FLIP_THRESHOLDS = {"rougeL": 0.10, "bleu": 10.0, "chrf": 10.0, "exact": 0.5, "contains": 0.5}
TABLE_METRICS = ("ppl", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact", "contains", "tokens")
PERCENT = ("rouge1", "rouge2", "rougeL", "exact", "contains")  # 0-1, shown as 0-100


def item_key(item: dict[str, Any]) -> str:
    """What identifies an item's line: a hash of its prompt and reference."""
    text = json.dumps([item["messages"], item["reference"]], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ItemLog:
    """One target's finished items in a JSONL file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._read()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        whole = raw[: raw.rfind(b"\n") + 1]  # a line the kill cut short is dropped
        if len(whole) != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(len(whole))
        for line in whole.splitlines():
            entry = json.loads(line)
            self.done[entry["key"]] = entry

    def add(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[entry["key"]] = entry


def perplexity(entries: Iterable[dict[str, Any]]) -> float | None:
    """Token-weighted perplexity of the reference answers over entries that were scored."""
    import math

    scored = [e for e in entries if e.get("count")]
    count = sum(e["count"] for e in scored)
    return math.exp(min(sum(e["nll"] for e in scored) / count, 50)) if count else None


def deltas(totals: list[dict[str, Any]]) -> list[dict[str, float | None]]:
    """Each target's totals minus the first target's (None where either is missing)."""
    base = totals[0]
    return [{k: None if t.get(k) is None or base.get(k) is None else t[k] - base[k]
             for k in TABLE_METRICS} for t in totals]


def flips(base: Sequence[dict[str, float]], target: Sequence[dict[str, float]]
          ) -> dict[str, dict[str, list[int]]]:
    """metric -> {"better": item indexes, "worse": item indexes} past FLIP_THRESHOLDS."""
    out: dict[str, dict[str, list[int]]] = {}
    for metric, limit in FLIP_THRESHOLDS.items():
        moved = [(i, t[metric] - b[metric]) for i, (b, t) in enumerate(zip(base, target, strict=True))]
        out[metric] = {"better": [i for i, d in moved if d >= limit],
                       "worse": [i for i, d in moved if d <= -limit]}
    return out


def scale(metric: str) -> float:
    """ROUGE, exact and contains are kept 0-1 and shown 0-100; the rest as they are."""
    return 100.0 if metric in PERCENT else 1.0


def format_value(metric: str, value: float) -> str:
    """A total as shown: three decimals for perplexity, one for the rest (after `scale`)."""
    return f"{value * scale(metric):.{3 if metric == 'ppl' else 1}f}"


def format_delta(metric: str, delta: float) -> str:
    """A delta to the base as shown, its sign written out."""
    return f"{delta * scale(metric):+.{3 if metric == 'ppl' else 1}f}"


def _cell(metric: str, value: float | None, delta: float | None = None) -> str:
    if value is None:
        return "-"
    shown = format_value(metric, value)
    return shown if delta is None else f"{shown} ({format_delta(metric, delta)})"


def table(report: dict[str, Any]) -> str:
    """Targets x metrics, each with its delta to the first target, then the flips."""
    rows = report["targets"]
    header = ["target", *TABLE_METRICS]
    cells = [[r["name"], *(_cell(m, r["totals"].get(m), None if i == 0 else r["deltas"].get(m))
                           for m in TABLE_METRICS)] for i, r in enumerate(rows)]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(header)]
    lines = [f"eval on {report['items']} held-out items of {report['data']['name']} (greedy, at most "
             f"{report['settings']['max_new_tokens']} new tokens); ROUGE, exact and contains in %, "
             f"BLEU ({report['settings']['bleu_tokenize']}) and chrF 0-100; (delta to "
             f"{rows[0]['name']})",
             "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines += [line for r in rows[1:] for line in flip_lines(rows[0]["name"], r)]
    judge = report["settings"].get("judge")
    if judge:
        lines.append(f"judge {judge['name']} (asked twice per item, A and B swapped; rubric "
                     f"{judge['rubric']}):")
        lines += [f"  {judge_line(rows[0]['name'], r)}" for r in rows[1:]]
    return "\n".join(lines)


def judge_line(base: str, row: dict[str, Any]) -> str:
    """A target's verdict counts against the base and how often the two orders agreed."""
    j = row["judge"]
    agreement = "-" if j["agreement"] is None else f"{j['agreement'] * 100:.0f}%"
    skipped = f", {j['skipped']} skipped (prompt too long for the judge)" if j["skipped"] else ""
    return (f"{row['name']} vs {base}: {j['wins']} won, {j['losses']} lost, {j['ties']} tied, "
            f"{j['inconsistent']} inconsistent{skipped}; the two orders agree on {j['agreed']} of "
            f"{j['judged']} ({agreement})")


def _order_cell(asked: dict[str, Any]) -> str:
    if asked.get("label") is None:
        return f"not asked ({asked.get('reason', '?')})"
    p = asked["p"]
    return f"{asked['label']} = {asked['winner']} (A {p['A']:.2f}, B {p['B']:.2f}, tie {p['tie']:.2f})"


def _judge_markdown(report: dict[str, Any]) -> list[str]:
    rows, judge = report["targets"], report["settings"]["judge"]
    out = ["", "## Judge", "",
           f"- judge: `{_md(judge['name'])}` ({_md(judge['file'])}, sha256 {judge['sha256'][:16]}…, "
           f"parity {judge['parity']})",
           f"- rubric: {_md(judge['rubric'])} (sha256 {judge['rubric_sha256'][:16]}…)",
           f"- each item asked twice: {'; '.join(judge['orders'])}; verdict: {judge['verdict']}",
           "- an item is a win or a loss for the target only when both orders say so; orders that "
           "disagree make it inconsistent", "",
           "| target | won | lost | tied | inconsistent | skipped | orders agree |",
           "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        j = r["judge"]
        agreement = "-" if j["agreement"] is None else f"{j['agreement'] * 100:.0f}%"
        out.append(f"| {_md(r['name'])} | {j['wins']} | {j['losses']} | {j['ties']} | "
                   f"{j['inconsistent']} | {j['skipped']} | {j['agreed']} of {j['judged']} "
                   f"({agreement}) |")
    out += ["", "| # | target | order 1 (A = base) | order 2 (A = target) | verdict |",
            "|---|---|---|---|---|"]
    for r in rows[1:]:
        for i, item in enumerate(r["items"]):
            v = item["judge"]
            out.append(f"| {i} | {_md(r['name'])} | {_order_cell(v['order1'])} | "
                       f"{_order_cell(v['order2'])} | {v['verdict']} |")
    return out


def flip_lines(base: str, row: dict[str, Any]) -> list[str]:
    """One line per metric with flips: which items got better or worse from the base."""
    out = []
    for metric, moved in row["flips"].items():
        if moved["better"] or moved["worse"]:
            out.append(f"{row['name']} vs {base}: {metric} better on {_items(moved['better'])}, "
                       f"worse on {_items(moved['worse'])} (threshold {FLIP_THRESHOLDS[metric]:g})")
    return out or [f"{row['name']} vs {base}: no item moved past a threshold"]


def _items(indexes: list[int]) -> str:
    return f"{len(indexes)} item(s)" + (f" (#{', #'.join(map(str, indexes))})" if indexes else "")


def _md(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def markdown(report: dict[str, Any], items: Sequence[dict[str, Any]]) -> str:
    """The report file: what was evaluated how, the totals with deltas, flips, and every item."""
    rows, settings = report["targets"], report["settings"]
    out = [f"# Evaluation {report['name']}", "",
           f"- data: {report['data']['kind']} `{report['data']['name']}`, {report['items']} items",
           f"- generation: greedy, at most {settings['max_new_tokens']} new tokens, seed "
           f"{settings['seed']}, each target through its own runtime",
           f"- tokens: ROUGE on {settings['rouge_tokens']}; BLEU with sacrebleu's "
           f"`{settings['bleu_tokenize']}` tokenizer; chrF on characters",
           "- perplexity: of the reference answers, per target, through its runtime", "",
           "| target | runtime | " + " | ".join(TABLE_METRICS) + " |",
           "|---|---|" + "---|" * len(TABLE_METRICS)]
    for i, r in enumerate(rows):
        values = (_cell(m, r["totals"].get(m), None if i == 0 else r["deltas"].get(m))
                  for m in TABLE_METRICS)
        out.append(f"| {_md(r['name'])} | {r['runtime']} | " + " | ".join(values) + " |")
    out += ["", "## Flips (per item, against the first target)", ""]
    out += [f"- {_md(line)}" for r in rows[1:] for line in flip_lines(rows[0]["name"], r)]
    if settings.get("judge"):
        out += _judge_markdown(report)
    out += ["", "## Items (chrF per target)", "",
            "| # | prompt | reference | " + " | ".join(_md(r["name"]) for r in rows) + " |",
            "|---|---|---|" + "---|" * len(rows)]
    for i, item in enumerate(items):
        answers = (f"{_md(r['items'][i]['answer'], 120)} (chrF {r['items'][i]['scores']['chrf']:.1f})"
                   for r in rows)
        out.append(f"| {i} | {_md(item['messages'][-1]['content'], 100)} | "
                   f"{_md(item['reference'], 120)} | " + " | ".join(answers) + " |")
    return "\n".join(out) + "\n"
