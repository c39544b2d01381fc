"""What each export of a run costs and loses, side by side: the frontier an operator picks from.

Issue 18's "quality/size/speed frontier per run": the parity gate already scores every export on
the run's held-out chats (Δppl, KL, greedy agreement against the merged model); it now also times
a short greedy decode in the runtime that scored it (`decode_speed`, on this box, with the job's
threads). `frontier(ws, run)` gathers those with each export's size on disk and marks the exports
no other one beats on all three of size, Δppl and speed (the Pareto frontier): the ones worth
choosing between. Nothing is exported here: `appliance export gguf|onnx RUN --quant ...` makes more
candidates, each gated (and timed) as it is made; `appliance verify EXPORT` times an older one.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from appliance import manifest
from appliance.workspace import ArtifactRecord, Workspace

DECODE_TOKENS = 32
PROMPT_TOKENS = 128  # the start of a held-out conversation: within the gate's GGUF context
REPEATS = 3


class Generator(Protocol):
    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]: ...


def decode_speed(runtime: Generator, prompt: Sequence[int]) -> dict[str, Any]:
    """Greedy decode tokens/s of `runtime` after `prompt` (its first PROMPT_TOKENS ids): the time of
    DECODE_TOKENS + 1 new tokens minus that of 1 (the prompt pass), median of REPEATS after a
    warm-up; no stop token ends it early."""
    ids = list(prompt[:PROMPT_TOKENS])
    runtime.generate(ids, 2, [])  # warm-up: first-call allocations, caches
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        runtime.generate(ids, 1, [])
        prompt_pass = time.perf_counter() - start
        start = time.perf_counter()
        runtime.generate(ids, DECODE_TOKENS + 1, [])
        decode = time.perf_counter() - start - prompt_pass
        if decode > 0:
            rates.append(DECODE_TOKENS / decode)
    return {"decode_tokens_per_s": round(statistics.median(rates), 1) if rates else None,
            "decode_tokens": DECODE_TOKENS}


@dataclass
class Row:
    name: str
    format: str
    type: str
    status: str
    size_bytes: int
    ppl_increase: float | None
    kl: float | None
    agreement: float | None
    decode_tokens_per_s: float | None
    frontier: bool = False


def frontier(ws: Workspace, run: str) -> list[Row]:
    """The run's GGUF and ONNX exports, smallest first, each marked if it is on the frontier."""
    rows = [_row(record, config) for record, config in _exports(ws, run)]
    rows.sort(key=lambda r: (r.size_bytes, r.name))
    mark(rows)
    return rows


def mark(rows: list[Row]) -> None:
    """Mark the rows that are gated, not failed, and beaten by no other row."""
    for row in rows:
        row.frontier = (row.status != "failed" and row.ppl_increase is not None
                        and not any(_beats(other, row) for other in rows))


def _exports(ws: Workspace, run: str) -> list[tuple[ArtifactRecord, dict[str, Any]]]:
    out = []
    for record in ws.list("export"):
        if record.summary.get("run") != run or record.summary.get("format") not in ("gguf", "onnx"):
            continue
        out.append((record, manifest.read(record.path).get("config", {})))
    return out


def _row(record: ArtifactRecord, config: dict[str, Any]) -> Row:
    path = record.path / "parity.json"
    result = json.loads(path.read_text(encoding="utf-8"))["artifacts"][0] if path.is_file() else {}
    size = sum(f.stat().st_size for f in record.path.rglob("*") if f.is_file())
    return Row(record.name, str(config.get("format")), str(config.get("type") or config.get("precision")),
               record.status, size, result.get("ppl_increase"), result.get("kl"), result.get("agreement"),
               result.get("decode_tokens_per_s"))


def _beats(a: Row, b: Row) -> bool:
    """a is at least as small, as close and as fast as b (speed unknown on either side: not
    compared), and better on one of them; a failed export beats nothing."""
    if a is b or a.ppl_increase is None or b.ppl_increase is None or a.status == "failed":
        return False
    speeds = a.decode_tokens_per_s is not None and b.decode_tokens_per_s is not None
    no_worse = (a.size_bytes <= b.size_bytes and a.ppl_increase <= b.ppl_increase
                and (not speeds or a.decode_tokens_per_s >= b.decode_tokens_per_s))  # type: ignore[operator]
    better = (a.size_bytes < b.size_bytes or a.ppl_increase < b.ppl_increase
              or (speeds and a.decode_tokens_per_s > b.decode_tokens_per_s))  # type: ignore[operator]
    return no_worse and better


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def table(rows: list[Row]) -> str:
    """The frontier as text: one line per export, '*' on the frontier."""
    lines = [f"  {'export':40} {'type':8} {'MiB':>8} {'Δppl':>8} {'KL':>7} {'agree':>7} {'tok/s':>7}  status"]
    for r in rows:
        lines.append(f"{'*' if r.frontier else ' '} {r.name[:40]:40} {r.type:8} {r.size_bytes / 2**20:8.1f} "
                     f"{_pct(r.ppl_increase):>8} {_num(r.kl, '.4f'):>7} {_pct(r.agreement, False):>7} "
                     f"{_num(r.decode_tokens_per_s, '.1f'):>7}  {r.status}")
    return "\n".join(lines)


def _pct(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else (f"{value:+.2%}" if signed else f"{value:.1%}")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
