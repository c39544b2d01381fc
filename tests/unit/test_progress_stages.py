"""Staged progress (`appliance.progress`): the events `Stages` writes, how few a long stage writes,
how the CLI describes them, and the counts read from llama.cpp's tools' output."""

from __future__ import annotations

from typing import Any

from appliance.progress import BUCKETS, Stages, counts, describe, fraction
from appliance.textout import format_event
from export import gguf


def _recorded() -> tuple[list[dict[str, Any]], Stages]:
    events: list[dict[str, Any]] = []

    def progress(done: float, total: float, **fields: Any) -> None:
        events.append({"type": "progress", "done": done, "total": total, **fields})

    return events, Stages(progress, artifacts_total=2)


def test_a_counted_stage_reports_its_ends_and_each_twentieth_between() -> None:
    events, stages = _recorded()
    stages.start("run-gguf-q8_0")
    count = stages.counter("quantize", "quantizing to Q8_0", "tensors")
    for done in range(1, 1001):
        count(done, 1000)
    assert events[0] == {"type": "progress", "done": 0, "total": 0, "stage": "quantize",
                         "label": "quantizing to Q8_0", "unit": "tensors", "artifact": "run-gguf-q8_0",
                         "artifacts_done": 0, "artifacts_total": 2}
    assert [e["done"] for e in events[1:]] == [1, *range(50, 1001, 50)]
    assert len(events) <= BUCKETS + 2


def test_artifacts_are_counted_and_the_end_is_reported() -> None:
    events, stages = _recorded()
    stages.reused("run-merged")
    for name in ("run-gguf-q8_0", "run-gguf-q4_k_m"):
        stages.start(name)
        stages.emit("check", f"checking {name}")
        stages.finished(name)
    stages.done()
    assert [(e["stage"], e["artifact"], e["artifacts_done"]) for e in events] == [
        ("reuse", "run-merged", 0), ("check", "run-gguf-q8_0", 0), ("check", "run-gguf-q4_k_m", 1),
        ("done", "run-gguf-q4_k_m", 2)]
    assert events[-1]["done"] == events[-1]["total"] == 2


def test_nothing_is_reported_without_a_callback() -> None:
    stages = Stages()
    stages.counter("score", "scoring q8_0", "conversations", 16)(3, 16)
    stages.done()  # no error, nothing to write to


def test_descriptions_show_counts_only_where_they_are_known() -> None:
    event = {"type": "progress", "done": 5, "total": 16, "stage": "score", "label": "scoring q8_0",
             "unit": "conversations", "artifact": "run-gguf-q8_0", "artifacts_done": 1,
             "artifacts_total": 2}
    assert describe(event) == "run-gguf-q8_0 (1/2 done): scoring q8_0 5/16 conversations"
    assert format_event(event) == describe(event)
    assert fraction(event) == 5 / 16
    unknown = {**event, "stage": "convert", "label": "converting to GGUF F16", "done": 0, "total": 0,
               "unit": "%", "artifacts_total": 1}
    assert fraction(unknown) is None and counts(unknown) == ""
    assert describe(unknown) == "run-gguf-q8_0: converting to GGUF F16"
    assert counts({**unknown, "done": 40, "total": 100}) == "40%"
    assert counts({**event, "unit": "", "done": 1, "total": 1}) == ""  # a reuse: nothing counted
    # training's progress events (no stage) print as before
    assert format_event({"type": "progress", "done": 3, "total": 10, "loss": 1.25}) == "step 3/10 loss=1.25"


def test_counts_are_read_from_llama_cpp_output() -> None:
    seen: list[tuple[int, int]] = []
    lines: list[str] = []
    say = gguf._counting(lines.append, lambda done, total: seen.append((done, total)))
    for line in ("INFO:hf-to-gguf:Set model tokenizer",
                 "Writing:   0%|          | 0.00/6.44M [00:00<?, ?byte/s]",
                 "Writing:  42%|████▏     | 2.71M/6.44M [00:00<00:00, 388Mbyte/s]",
                 "[  12/ 272] blk.0.ffn_gate.weight - [64, 128, 1, 1], type = f16, converting to q8_0",
                 "llama_model_quantize_impl: model size  =     6.14 MiB (16.00 BPW)"):
        say(line)
    assert seen == [(0, 100), (42, 100), (12, 272)]
    assert len(lines) == 5  # every line still goes to the log
