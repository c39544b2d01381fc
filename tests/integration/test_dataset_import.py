"""Dataset import against the real SmolLM2 tokenizer and chat template, through the API and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ExitCode, ValidationError
from appliance.stages.datasets import importer as datasets
from appliance.workspace import ArtifactRecord, Workspace

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "appliance" / "data" / "dolly-sample" / "dolly_sample.jsonl"
LONG = {"instruction": "Describe the sea. " * 10, "response": "It is wide and deep and blue. " * 10}
LINES: list[bytes | dict[str, Any]] = [
    {"instruction": "Name a color.", "response": "Blue."},                                   # 1
    {"instruction": "Name a fruit.", "context": "Only red ones.", "response": "Cherry."},    # 2
    b'{"instruction": "Broken',                                                             # 3
    {"instruction": "Name a planet.", "response": "Mars."},                                 # 4
    {"instruction": "No answer here."},                                                     # 5
    LONG,                                                                                   # 6
    b"",                                                                                    # 7
    {"instruction": "Name a tree.", "context": "", "response": "Oak."},                     # 8
    {"instruction": "Name a color.", "response": "Blue."},                                  # 9: dup of 1
    {"instruction": "Name a bird.", "response": "Robin."},                                  # 10
]
REJECTED = [(3, "bad_json"), (5, "missing_field"), (7, "empty_line")]


def write(path: Path, lines: list[bytes | dict[str, Any]]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n"
                              for x in lines))
    return path


def count(tokenizer: Any, messages: datasets.Messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_import_mixed_file(model_workspace: tuple[Workspace, ArtifactRecord], smol_tokenizer: Any,
                           tmp_path: Path) -> None:
    ws, model = model_workspace
    record, report = datasets.import_file(ws, write(tmp_path / "mixed.jsonl", LINES), model,
                                          eval_fraction=0.3, seed=1)
    assert record.name == "mixed" and record.path == ws.root / "datasets" / "mixed"
    assert {p.name for p in record.path.iterdir()} == {"train.jsonl", "eval.jsonl", "report.json",
                                                       "manifest.json"}
    manifest = json.loads((record.path / "manifest.json").read_text())
    assert manifest["parents"] == [{"kind": "model", "name": model.name,
                                    "manifest_sha256": model.manifest_sha256}]
    assert json.loads((record.path / "report.json").read_text()) == report
    assert [(r["line"], r["code"]) for r in report["rejections"]] == REJECTED
    assert report["duplicate_lines"] == [{"line": 9, "duplicate_of": 1}]
    assert (report["form"], report["lines"], report["kept"]) == ("dolly", 10, 6)
    assert (report["train"], report["eval"]) == (4, 2)
    rows = datasets.load_rows(record, "train") + datasets.load_rows(record, "eval")
    assert sorted(r["line"] for r in rows) == [1, 2, 4, 6, 8, 10]
    for row in rows:
        assert row["tokens"] == count(smol_tokenizer, row["messages"])
    second = next(r for r in rows if r["line"] == 2)
    assert second["messages"][0]["content"] == "Name a fruit.\n\nOnly red ones."
    tokens = [r["tokens"] for r in rows]
    stats = report["tokens"]
    assert (stats["count"], stats["total"], stats["min"], stats["max"]) == (
        6, sum(tokens), min(tokens), max(tokens))
    assert sum(h["count"] for h in stats["histogram"]) == 6


def test_max_tokens_rejects_long_rows(model_workspace: tuple[Workspace, ArtifactRecord],
                                      smol_tokenizer: Any, tmp_path: Path) -> None:
    ws, model = model_workspace
    long_tokens = count(smol_tokenizer, datasets.convert(LONG, "dolly"))
    assert long_tokens > 60
    _, report = datasets.import_file(ws, write(tmp_path / "mixed.jsonl", LINES), model, max_tokens=60)
    assert [(r["line"], r["code"]) for r in report["rejections"]] == sorted([*REJECTED, (6, "too_long")])
    too_long = next(r for r in report["rejections"] if r["code"] == "too_long")
    assert f"{long_tokens} tokens > 60" in too_long["reason"]
    assert report["kept"] == 5 and report["tokens"]["max"] <= 60


def test_all_bad_lines_raise(model_workspace: tuple[Workspace, ArtifactRecord], tmp_path: Path) -> None:
    ws, model = model_workspace
    path = write(tmp_path / "bad.jsonl", [b"nope", {"instruction": "Q"}, b"\xff"])
    with pytest.raises(ValidationError, match=r"line 1: .*line 2: .*line 3: not UTF-8"):
        datasets.import_file(ws, path, model)
    assert ws.list("dataset") == []


def cli(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(ws.root), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_end_to_end(model_workspace: tuple[Workspace, ArtifactRecord], tmp_path: Path) -> None:
    ws, model = model_workspace
    src = write(tmp_path / "mixed.jsonl", LINES)
    done = cli(ws, "data", "import", str(src), "--model", model.name)
    assert done.returncode == 0, done.stderr
    for line, _ in REJECTED:
        assert f"line {line}: " in done.stdout
    assert "line 9: duplicate of line 1" in done.stdout
    shown = cli(ws, "data", "show", "mixed")
    assert shown.returncode == 0, shown.stderr
    assert "line 3: bad JSON" in shown.stdout and model.name in shown.stdout
    listed = cli(ws, "data", "list")
    assert listed.returncode == 0, listed.stderr
    assert "mixed" in listed.stdout and "dolly" in listed.stdout
    missing = cli(ws, "data", "import", str(tmp_path / "absent.jsonl"), "--model", model.name)
    assert missing.returncode == ExitCode.NOT_FOUND
    assert missing.stderr.startswith("error:") and "absent.jsonl" in missing.stderr


def test_shipped_dolly_sample(model_workspace: tuple[Workspace, ArtifactRecord]) -> None:
    ws, model = model_workspace
    record, report = datasets.import_file(ws, SAMPLE, model)
    assert (report["form"], report["lines"], report["rejected"]) == ("dolly", 401, 0)
    assert report["train"] + report["eval"] == 401 == report["tokens"]["count"]
    assert len(datasets.load_rows(record, "train")) == report["train"]


HUGE_LINE_BYTES = 50_000_000


def test_bad_and_huge_lines_are_rejected_and_the_rest_imported(
        model_workspace: tuple[Workspace, ArtifactRecord], smol_tokenizer: Any, tmp_path: Path) -> None:
    """With the real tokenizer: a lone surrogate (was a tokenizer TypeError), 100,000 nested brackets
    (was a RecursionError) and a 50 MB line (was tokenized whole: 198 s, 4.5 GB) are each rejected
    with their line number and reason, and the other lines are imported."""
    ws, model = model_workspace
    path = tmp_path / "nasty.jsonl"
    write(path, [LINES[0],
                 b'{"instruction": "Say \\ud800", "response": "No."}',
                 b'{"instruction": ' + b"[" * 100_000 + b"]" * 100_000 + b', "response": "x"}',
                 LINES[3]])
    huge = b'{"instruction": "' + b"x" * HUGE_LINE_BYTES + b'", "response": "R"}'
    with open(path, "ab") as fh:
        fh.write(huge + b"\n")
        fh.write(json.dumps({"instruction": "Name a tree.", "response": "Oak."}).encode() + b"\n")
    _, report = datasets.import_file(ws, path, model, eval_fraction=0)
    codes = [(r["line"], r["code"]) for r in report["rejections"]]
    assert codes == [(2, "bad_text"), (3, "bad_json"), (5, "too_long")]
    reasons = [r["reason"] for r in report["rejections"]]
    assert "lone surrogate \\ud800" in reasons[0] and "nested too deeply" in reasons[1]
    assert reasons[2].startswith(f"line of {len(huge):,} bytes: longer than any")
    assert report["kept"] == 3 and report["tokens"]["count"] == 3
    rows = datasets.load_rows(ws.get("dataset", "nasty"))
    assert [r["line"] for r in rows] == [1, 4, 6]
    assert all(r["tokens"] == count(smol_tokenizer, r["messages"]) for r in rows)
