"""What a hands-on operator pass found (2026-12-07), each held by a test: tables without Python
literals, a job start that says what it is, the right `rm` command in a hint, requests that name
nothing refused, a chat transcript that does not create folders, a context beyond training refused
by `exports fit`, and `serve` checking every byte of an export before it answers from it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import manifest
from appliance.cli.common import print_table
from appliance.errors import AlreadyExistsError, ExitCode, IntegrityError, ValidationError
from appliance.runtime import fit, service
from appliance.runtime.engine import Artifact
from appliance.stages.eval.request import EvalRequest
from appliance.stages.export.request import ExportRequest
from appliance.textout import EventPrinter, format_event
from appliance.workspace import Workspace
from tests.unit.test_runtime_fit import _gguf

ROOT = Path(__file__).resolve().parents[2]


def test_tables_print_dashes_flags_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([{"a": None, "b": True, "c": False, "d": "failed: no run\n  -> try runs list"}],
                ["a", "b", "c", "d"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2  # the header and one row: the hint's line stays out of the table
    assert out[1].split() == ["-", "yes", "no", "failed:", "no", "run"]


def test_a_training_start_reads_as_a_sentence() -> None:
    assert format_event({"type": "train-start", "attempt": 1, "max_steps": 16, "run": "r", "step": 0}) \
        == "training r: attempt 1, 16 steps"
    assert format_event({"type": "train-start", "attempt": 2, "max_steps": 16, "run": "r", "step": 8}) \
        == "training r: attempt 2, resuming at step 8 of 16"


def test_the_hint_for_a_taken_name_gives_a_command_that_exists(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    (ws.root / "datasets" / "d").mkdir(parents=True)
    with pytest.raises(AlreadyExistsError) as caught, ws.writer("dataset", "d"):
        pass
    assert "appliance data rm d --yes" in caught.value.hint
    help_text = subprocess.run([sys.executable, "-m", "appliance", "data", "rm", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    assert "--yes" in help_text


def test_requests_that_name_nothing_are_refused(tmp_path: Path) -> None:
    assert "types" in ExportRequest("run", "onnx", ()).problems()
    assert "types" in ExportRequest("run", "gguf", ()).problems()
    assert "types" not in ExportRequest("run", "onnx", ("int4",)).problems()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in EvalRequest(("m",), str(empty)).problems()["data"]


def test_chat_save_does_not_make_folders(tmp_path: Path) -> None:
    from tests.unit.test_runtime_console import Script

    target = tmp_path / "no" / "such" / "dir" / "t.json"
    script = Script("Hi", f"/save {target}", "/quit")
    assert script.session().run() == 0
    assert not (tmp_path / "no").exists()
    assert any(f"not saved: {target.parent} is not a folder" in n for n in script.notes)


def test_exports_fit_refuses_a_context_beyond_training(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf", ctx=512)
    assert fit.context_for("gguf", path, 512) == 512
    with pytest.raises(ValidationError, match=r"more than the model was trained on \(512\)"):
        fit.context_for("gguf", path, 100_000)


def test_serve_checks_every_byte_of_an_export_before_loading_it(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    gguf = _gguf(folder / "m.Q8_0.gguf")
    manifest.write(folder, manifest.build(folder, kind="export", name="m"))
    said: list[str] = []
    service.verify_files(Artifact("m", "gguf", gguf, "pass"), said.append)
    assert said and "checking the sha256 of m's files" in said[0]
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 1  # the same size: resolving by sizes alone does not see it
    gguf.write_bytes(bytes(data))
    manifest.verify(folder, full=False)
    with pytest.raises(IntegrityError, match=r"m\.Q8_0\.gguf"):
        service.verify_files(Artifact("m", "gguf", gguf, "pass"), said.append)
    loose = _gguf(tmp_path / "loose.gguf")  # no manifest: nothing to check against
    service.verify_files(Artifact("loose", "gguf", loose, "unknown"), said.append)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_unknown_names_are_refused_before_a_job_is_queued(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    for args in (("export", "onnx", "nosuch", "--precision", "int4"), ("export", "plan", "nosuch"),
                 ("verify", "nosuch"), ("eval", "nosuch", "nosuch2", "--limit", "2")):
        done = _cli(home, *args)
        assert done.returncode == ExitCode.NOT_FOUND, (args, done.stdout, done.stderr)
        assert "nosuch" in done.stderr and "Traceback" not in done.stderr
    listed = json.loads(_cli(home, "jobs", "list", "--json").stdout)
    assert listed == []


def test_an_export_of_a_run_without_held_out_data_is_refused_before_the_merge(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    report = {"kept": 1, "train": 1, "eval": 0}
    with ws.writer("dataset", "d") as w:
        (w.path / "report.json").write_text(json.dumps(report))
        w.commit(info={"summary": {"train": 1, "eval": 0}})  # what the importer records
    with ws.writer("run", "r") as w:
        (w.path / "adapter.txt").write_text("x")
        w.commit(parents=[{"kind": "dataset", "name": "d"}])
    done = _cli(ws.root, "export", "gguf", "r", "--quant", "Q8_0")
    assert done.returncode == ExitCode.INVALID, done.stderr
    assert "no held-out (eval) conversations" in done.stderr
    assert json.loads(_cli(ws.root, "jobs", "list", "--json").stdout) == []


def test_int4_cuda_takes_the_layout_an_int4_export_of_the_same_merge_measured(tmp_path: Path) -> None:
    """An int4-cuda export after an int4 one (another job) reuses its measured layout: no fp32
    graph and no backward passes again (the fp32 path below does not exist: measuring would fail)."""
    from appliance.progress import QUIET, Stages
    from appliance.stages.export import layout
    from appliance.workspace import ArtifactRecord

    ws = Workspace(tmp_path / "ws")
    ws.ensure()
    merged = ArtifactRecord("export", "r-merged", tmp_path, "", "merged-sha", "ready", {})
    doc = {"run": "r", "dataset": "d", "split": "train", "conversation_sha256": ["h"],
           "scores": {"m": 1.0}, "eight_bit": ["/model/layers.0/mlp/down_proj/MatMul"]}
    calibration = {"used": True, "source": "run", "method": "fisher", "draws": layout.DRAWS,
                   "seed": layout.SEED, "file": layout.LAYOUT_FILE}

    def export(name: str, parent_sha: str, used: bool = True) -> None:
        with ws.writer("export", name) as w:
            (w.path / layout.LAYOUT_FILE).write_text(json.dumps(doc))
            w.commit(parents=[{"kind": "export", "name": "r-merged", "manifest_sha256": parent_sha}],
                     info={"calibration": {**calibration, "used": used}})

    def plan() -> layout.Layout:
        return layout.Layout(ws, "r", layout.AUTO, tmp_path / "scratch", Stages(), QUIET)

    export("other-merge-onnx-int4", "another-sha")  # another merge's: not this model's layout
    export("r-onnx-int4-off", "merged-sha", used=False)  # the fixed layout: nothing measured
    assert not plan().reuse(merged)
    export("r-onnx-int4", "merged-sha")
    taken = plan()
    assert taken.reuse(merged)
    keep, record = taken.get(tmp_path / "no-fp32-graph", merged)
    assert keep == doc["eight_bit"] and record["reused_from"] == "r-onnx-int4" and record["used"]
    out = tmp_path / "beside"
    out.mkdir()
    taken.write_beside(out)  # the new export carries its own copy of the layout file
    assert json.loads((out / layout.LAYOUT_FILE).read_text()) == doc
    off = layout.Layout(ws, "r", layout.OFF, tmp_path / "scratch", Stages(), QUIET)
    assert not off.reuse(merged) and off.get(tmp_path, merged)[0] is None


def test_the_tools_noise_stays_out_of_a_job_log() -> None:
    """The converter logs the chat template whole (a line of Jinja after another) and the
    quantizer a banner and its loader: the job log keeps what an operator reads."""
    from appliance.stages.export.convert import tool_lines
    from export import imatrix

    said: list[str] = []
    relay = tool_lines(said.append)
    for line in ["INFO:hf-to-gguf:Model architecture: LlamaForCausalLM",
                 "INFO:gguf.vocab:Setting chat_template to {% for message in messages %}",
                 "You are a helpful AI assistant<|im_end|>", "' }}{% endif %}",
                 "WARNING:hf-to-gguf:unknown key", "Writing:  50%|#####",
                 "Traceback (most recent call last):",
                 "INFO:hf-to-gguf:Model successfully exported to x.gguf"]:
        relay(line)
    assert said == ["INFO:hf-to-gguf:Model architecture: LlamaForCausalLM",
                    "WARNING:hf-to-gguf:unknown key", "Traceback (most recent call last):",
                    "INFO:hf-to-gguf:Model successfully exported to x.gguf"]
    said.clear()
    counted: list[tuple[int, int]] = []
    quantize = imatrix._quantize_line(said.append, lambda d, t: counted.append((d, t)))
    for line in ["version: 0.5.0-dev (build 0)", "built with GNU 12.2.0 for Linux x86_64",
                 "====== llama_model_quantize_impl: did not find weights for token_embd.weight",
                 "load_imatrix: loaded 210 importance matrix entries", "[   1/ 211] token_embd.weight",
                 "llama_model_quantize_impl: model size  =   256.6 MiB", "main: failed to quantize model"]:
        quantize(line)
    assert counted == [(1, 211)]
    assert said == ["llama_model_quantize_impl: model size  =   256.6 MiB", "main: failed to quantize model"]


def test_bitsandbytes_hub_kernel_warning_is_not_in_job_logs() -> None:
    """bitsandbytes, on an AVX512-BF16 CPU, warns at import that the hub's `kernels` package is
    missing (and says to install it): the offline guard every entry point installs mutes it."""
    import logging

    from appliance import offline

    offline.install()
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.ERROR)


def _counted(done: int, total: int = 40) -> dict:
    return {"type": "progress", "stage": "tokenize", "label": "tokenizing 40 conversations",
            "done": done, "total": total, "unit": "conversations", "artifact": "r"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_counted_stage_prints_its_ends_when_piped_and_updates_in_place_on_a_terminal() -> None:
    """The demo piped to a file printed 22 lines for one tokenizing pass (every 1/20 of it)."""
    events = [_counted(n) for n in (0, 1, 2, 20, 38, 40)]
    events.insert(3, {"type": "log", "message": "a log line in between"})
    events.append({"type": "progress", "done": 1, "total": 16, "loss": 2.5})  # a training step
    events.append({"type": "progress", "stage": "load-model", "label": "loading m on cpu",
                   "artifact": "r"})  # a stage of unknown size: one line

    piped = io.StringIO()
    show = EventPrinter(indent="  ", stream=piped)
    for event in events:
        show(event)
    assert piped.getvalue().splitlines() == [
        "  r: tokenizing 40 conversations 0/40 conversations",
        "  a log line in between",
        "  r: tokenizing 40 conversations 40/40 conversations",
        "  step 1/16 loss=2.5",
        "  r: loading m on cpu"]

    terminal = _Terminal()
    show = EventPrinter(stream=terminal)
    for event in events:
        show(event)
    out = terminal.getvalue()
    assert out.count("\n") == 4  # the log line, the stage's end, the step, the uncounted stage
    assert "\r\x1b[K" + "r: tokenizing 40 conversations 40/40 conversations\n" in out
    assert "\r\x1b[K" + "a log line in between\n" in out  # it took the place of the counting line
    assert "\rr: tokenizing 40 conversations 2/40 conversations\x1b[K" in out
