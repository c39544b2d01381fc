"""The importance matrix of a GGUF export without running llama.cpp: the calibration text (the run's
training conversations in the model's template, whole, in order, hashed), the plan for
`--imatrix auto|off|FILE` with and without the tools (refusals up front, auto's fallback line),
what an imatrix file must be, the reuse rule, and the tool runner (progress read as it comes,
the tool killed when the caller stops). tests/integration/test_exports.py runs the real tools."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import chat
from appliance.errors import NotFoundError, RefusedError, ValidationError
from appliance.stages.export import importance
from export import imatrix
from tests.conftest import TOKENIZER_DIR

ROWS = [{"messages": [{"role": "user", "content": f"question {i}?"},
                      {"role": "assistant", "content": f"answer number {i}."}]} for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from appliance.hfmodel import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- calibration text ------------------------------------------------------------------------------
def test_the_calibration_is_the_conversations_rendered_in_order_and_hashed(tokenizer: Any) -> None:
    found = importance.calibrate(ROWS, tokenizer, max_tokens=10**6)
    rendered = [chat.render(tokenizer, r["messages"]) for r in ROWS]
    assert found.text == "".join(rendered) and "<|im_start|>assistant\nanswer number 3." in found.text
    assert found.tokens == sum(_tokens(tokenizer, t) for t in rendered)
    canonical = json.dumps(ROWS[0]["messages"], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert found.hashes[0] == hashlib.sha256(canonical.encode()).hexdigest()
    record = found.record()
    assert record["conversations"] == record["conversations_total"] == 6
    assert record["conversations_sha256"] == hashlib.sha256("\n".join(found.hashes).encode()).hexdigest()
    assert record["text_sha256"] == hashlib.sha256(found.text.encode()).hexdigest()
    changed = [ROWS[0], {"messages": [*ROWS[1]["messages"][:1], {"role": "assistant", "content": "x"}]},
               *ROWS[2:]]
    other = importance.calibrate(changed, tokenizer, max_tokens=10**6)
    assert other.hashes[0] == found.hashes[0] and other.hashes[1] != found.hashes[1]
    assert other.record()["conversations_sha256"] != record["conversations_sha256"]


def test_the_budget_takes_whole_conversations_from_the_start(tokenizer: Any) -> None:
    one = _tokens(tokenizer, chat.render(tokenizer, ROWS[0]["messages"]))
    found = importance.calibrate(ROWS, tokenizer, max_tokens=2 * one + one // 2)
    assert len(found.hashes) == 2 and found.record()["conversations_total"] == 6
    assert found.text == "".join(chat.render(tokenizer, r["messages"]) for r in ROWS[:2])


# -- the plan ---------------------------------------------------------------------------------------
@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("APPLIANCE_SHARE", str(tmp_path / "share"))
    return tmp_path


@pytest.fixture
def fake_tools(no_tools: Path) -> Path:
    """Executables where set-up puts llama.cpp's tools (the plan only looks for them)."""
    bin_dir = no_tools / "share" / "llama.cpp" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("llama-imatrix", "llama-quantize"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'version: test'\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def write_imatrix(path: Path, kind: str = "imatrix") -> Path:
    import gguf as gguf_py
    import numpy as np

    writer = gguf_py.GGUFWriter(str(path), arch="")  # llama-imatrix writes no architecture either
    writer.add_string("general.type", kind)
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 7)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.0.ffn_down.weight.in_sum2", np.ones(8, dtype=np.float32))
    writer.add_tensor("blk.0.ffn_down.weight.counts", np.ones(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_auto_makes_one_for_the_types_below_six_bits(fake_tools: Path) -> None:
    said: list[str] = []
    plan = importance.plan("auto", ["Q8_0", "Q4_K_M", "IQ2_XS", "F16"], said.append)
    assert plan.types == {"Q4_K_M", "IQ2_XS"} and plan.file is None and said == []
    assert plan.reason("Q8_0") == "Q8_0 has 6 bits or more per weight"


def test_auto_without_the_tools_falls_back_with_one_line(no_tools: Path) -> None:
    said: list[str] = []
    plan = importance.plan("auto", ["Q8_0", "Q4_K_M", "Q5_K_M"], said.append)
    assert plan.types == frozenset() and len(said) == 1
    assert "llama-imatrix and llama-quantize are not installed" in said[0]
    assert "Q4_K_M, Q5_K_M without an importance matrix" in said[0] and "set-up" in said[0]
    assert "not installed" in plan.reason("Q4_K_M")
    assert importance.plan("auto", ["Q8_0"], said.append).types == frozenset() and len(said) == 1


@pytest.mark.parametrize(("choice", "types", "error", "words"), [
    ("auto", ["Q4_K_M", "IQ2_XS"], NotFoundError, "IQ2_XS need(s) an importance matrix"),
    ("some.imatrix", ["Q4_K_M"], NotFoundError, "--imatrix some.imatrix, but llama.cpp's"),
])
def test_without_the_tools_what_needs_them_is_refused_up_front(
        no_tools: Path, choice: str, types: list[str], error: type, words: str) -> None:
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        importance.plan(choice, types, print)
    assert "set-up" in (info.value.hint or "")


def test_off_refuses_the_types_that_need_one(fake_tools: Path) -> None:
    assert importance.plan("off", ["Q4_K_M"], print).types == frozenset()
    with pytest.raises(RefusedError, match="Q2_K_S needs an importance matrix"):
        importance.plan("off", ["Q4_K_M", "Q2_K_S"], print)


def test_a_file_must_be_an_imatrix_and_is_named(fake_tools: Path, tmp_path: Path) -> None:
    good = write_imatrix(tmp_path / "good.gguf")
    plan = importance.plan(str(good), ["Q4_K_M", "Q8_0"], print)
    assert plan.file == good.resolve() and plan.types == {"Q4_K_M"}
    assert imatrix.read_imatrix(good) == {"chunks": 7, "chunk_size": 512,
                                          "datasets": ["calibration.txt"], "entries": 1}
    model = write_imatrix(tmp_path / "model.gguf", kind="model")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"not a gguf at all")
    for bad in (model, junk, tmp_path / "missing.gguf"):
        with pytest.raises(ValidationError, match=str(bad)):
            importance.plan(str(bad), ["Q4_K_M"], print)


def test_an_existing_export_is_compared_with_what_would_be_made() -> None:
    used = {"imatrix": {"used": True, "sha256": "a"}}
    assert importance.existing_mismatch(used, True, None) is None
    assert importance.existing_mismatch(used, True, "a") is None
    assert importance.existing_mismatch(used, True, "b") == "made with another importance matrix"
    assert importance.existing_mismatch(used, False, None) == "made with an importance matrix"
    assert importance.existing_mismatch({}, True, None) == "made without an importance matrix"
    assert importance.existing_mismatch({}, False, None) is None  # an export from before imatrix


# -- the tools' runner ------------------------------------------------------------------------------
def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tool"
    path.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    path.chmod(0o755)
    return path


def test_progress_is_read_as_the_tool_writes_it(tmp_path: Path) -> None:
    tool = _script(tmp_path, "\n".join([
        "print('0.00.100.000 I compute_imatrix: computing over 3 chunks, n_ctx=512', flush=True)",
        "for i in (1, 2, 3):",
        "    sys.stdout.write(f'[{i}]9.{i},'); sys.stdout.flush(); time.sleep(0.05)",
        "print('\\nFinal estimate: PPL = 9.3')"]))
    counted: list[tuple[int, int]] = []
    count = imatrix._ChunkCount(lambda d, t: counted.append((d, t)))
    said: list[str] = []
    code, _ = imatrix.run_tool([str(tool)], imatrix._imatrix_line(said.append, count), count)
    assert code == 0 and counted[-1] == (3, 3) and (1, 3) in counted  # before the line ended
    assert said == ["compute_imatrix: computing over 3 chunks, n_ctx=512", "Final estimate: PPL = 9.3"]


def test_the_tool_is_killed_when_the_caller_stops(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    tool = _script(tmp_path, f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                             "print('started', flush=True)\ntime.sleep(60)")

    def stop(line: str) -> None:
        raise KeyboardInterrupt  # what a job's cancel raises from its signal handler (a BaseException)

    with pytest.raises(KeyboardInterrupt):
        imatrix.run_tool([str(tool)], stop)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running


def test_the_tools_get_no_llama_arg_options_and_find_their_libraries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_MODEL_URL", "https://example.invalid/m.gguf")
    env = imatrix.tool_env()
    assert "LLAMA_ARG_MODEL_URL" not in env and env["HF_HUB_OFFLINE"] == "1"
    from appliance import stack

    lib = stack.llama_lib_dir()
    assert lib is not None and (lib / "libllama.so").is_file()
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(lib)
