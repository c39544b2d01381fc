"""The export frontier's marking and the gate's decode timing (a fake clock: no wall-clock bound)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from appliance.stages.verify import frontier
from appliance.stages.verify.frontier import Row


def _row(name: str, mib: float, ppl: float | None, tok_s: float | None, status: str = "ready") -> Row:
    return Row(name, "gguf", name, status, int(mib * 2**20), ppl, 0.01, 0.9, tok_s)


def _marked(rows: list[Row]) -> set[str]:
    frontier.mark(rows)
    return {r.name for r in rows if r.frontier}


def test_only_what_nothing_beats_on_size_loss_and_speed_is_marked() -> None:
    rows = [_row("q8", 140, 0.005, 40.0), _row("q4", 90, 0.03, 55.0), _row("int4", 120, 0.10, 30.0),
            _row("q5", 100, 0.035, 50.0)]
    # int4: larger, worse and slower than q4; q5: larger, worse and slower than q4
    assert _marked(rows) == {"q8", "q4"}


def test_unknown_speed_is_not_compared_and_failed_exports_beat_nothing() -> None:
    rows = [_row("old", 90, 0.03, None), _row("new", 100, 0.04, 80.0)]
    assert _marked(rows) == {"old"}  # no speed on one side: size and loss decide
    rows = [_row("broken", 50, 0.01, 99.0, status="failed"), _row("ok", 100, 0.02, 40.0)]
    assert _marked(rows) == {"ok"}  # a failed export is listed, never chosen, and hides nothing
    rows = [_row("ungated", 50, None, None), _row("ok", 100, 0.02, 40.0)]
    assert _marked(rows) == {"ok"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeRuntime:
    """generate() takes 0.5 s for the prompt pass and 0.1 s per further token on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock, self.calls = clock, []

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        self.calls.append((len(ids), max_new_tokens, list(stop_ids)))
        self.clock.now += 0.5 + 0.1 * (max_new_tokens - 1)
        return [7] * max_new_tokens


def test_decode_speed_takes_the_prompt_pass_out(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(frontier.time, "perf_counter", clock)
    runtime = FakeRuntime(clock)
    result = frontier.decode_speed(runtime, list(range(500)))
    assert result == {"decode_tokens_per_s": 10.0, "decode_tokens": 32}  # 32 tokens in 3.2 s
    assert runtime.calls[0] == (128, 2, [])  # warm-up; the prompt cut to its first 128 ids, no stops
    assert runtime.calls[1:] == [(128, 1, []), (128, 33, [])] * 3
