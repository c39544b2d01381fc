"""The engine contract both runtimes share (a scripted engine: stop tokens, stop strings, length,
cancel, context overflow before any output, one generation at a time) and `resolve` on every kind
of reference: files, folders, workspace exports that passed, failed or are merged models."""

from __future__ import annotations

import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import BusyError, NotFoundError, RefusedError, ValidationError
from appliance.runtime.engine import (
    ContextOverflow,
    Delta,
    Done,
    EngineBase,
    Sampling,
    default_threads,
)
from appliance.runtime.engines import open_engine, resolve
from appliance.runtime.template import ChatTemplate
from appliance.workspace import Workspace

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PIECES = {10: "The", 11: " answer", 12: " is", 13: " 4", 14: ".", 15: "##", 16: "#", 17: " done"}
HI = [{"role": "user", "content": "Hi"}]
GREEDY = Sampling(temperature=0.0)


class ScriptedEngine(EngineBase):
    """Tokens come from a script; a prompt is one id per character of the rendered text."""

    name, kind = "scripted", "gguf"

    def __init__(self, script: list[int], context_length: int = 100) -> None:
        super().__init__()
        self.script, self.context_length = script, context_length
        self.template = ChatTemplate(CHATML)
        self.stop_ids = frozenset({2})
        self.closed_streams = 0

    def _encode(self, text: str) -> list[int]:
        return [ord(c) % 50 for c in text]

    def _tokens(self, ids: list[int], sampling: Sampling,
                cancel: threading.Event | None) -> Generator[int, None, None]:
        try:
            yield from self.script
        finally:
            self.closed_streams += 1

    def _decoder(self) -> Any:
        return (lambda token: PIECES[token]), (lambda: "")


def _collect(items: Any) -> tuple[str, list[Delta], Done]:
    out = list(items)
    assert all(isinstance(d, Delta) for d in out[:-1]) and isinstance(out[-1], Done)
    return "".join(d.text for d in out[:-1]), out[:-1], out[-1]


def test_a_stop_token_ends_the_answer_and_is_not_counted() -> None:
    engine = ScriptedEngine([10, 11, 12, 13, 14, 2, 17])
    text, deltas, done = _collect(engine.generate(HI, GREEDY))
    assert text == "The answer is 4." and [d.token_id for d in deltas] == [10, 11, 12, 13, 14]
    n = len(engine.prompt_ids(HI))
    assert done == Done("stop", n, 5) and engine.closed_streams == 1


def test_a_stop_string_split_over_tokens_never_shows() -> None:
    engine = ScriptedEngine([10, 15, 11, 15, 16, 17, 2])
    text, deltas, done = _collect(engine.generate(HI, Sampling(stop=("###",))))
    assert text == "The## answer" and done.reason == "stop" and done.completion_tokens == 5
    assert [d.text for d in deltas] == ["The", "", "## answer", "", ""]


def test_max_tokens_ends_with_length_and_flushes_held_text() -> None:
    engine = ScriptedEngine([10, 15, 11, 12])
    text, deltas, done = _collect(engine.generate(HI, Sampling(max_tokens=2, stop=("###",))))
    assert done.reason == "length" and done.completion_tokens == 2
    assert deltas[-1] == Delta("##", -1) and text == "The##"
    assert engine.closed_streams == 1  # the token stream was closed, not left hanging


def test_cancel_is_checked_after_every_token() -> None:
    cancel = threading.Event()
    engine = ScriptedEngine([10, 11, 12, 13, 2])
    stream = engine.generate(HI, GREEDY, cancel)
    assert next(stream) == Delta("The", 10)
    cancel.set()
    rest = list(stream)
    assert rest == [Done("cancelled", len(engine.prompt_ids(HI)), 1)]
    _, _, done = _collect(engine.generate(HI, GREEDY))  # the engine is usable again
    assert done.reason == "stop"


def test_context_overflow_is_raised_before_any_output() -> None:
    prompt = len(ScriptedEngine([]).prompt_ids(HI))
    engine = ScriptedEngine([10, 2], context_length=prompt + 4)
    with pytest.raises(ContextOverflow) as err:
        engine.generate(HI, Sampling(max_tokens=5))  # raised by the call, not by iterating
    found = err.value
    assert (found.prompt_tokens, found.max_tokens, found.context_length) == (prompt, 5, prompt + 4)
    assert "drop earlier turns" in (err.value.hint or "") and isinstance(err.value, ValidationError)
    assert _collect(engine.generate(HI, Sampling(max_tokens=4)))[2].reason == "stop"
    assert engine.budget(prompt, None) == 4  # None: the rest of the context
    full = ScriptedEngine([10], context_length=prompt)
    with pytest.raises(ContextOverflow, match="no room left for an answer"):
        full.generate(HI, GREEDY)


def test_bad_requests_fail_at_the_call() -> None:
    engine = ScriptedEngine([10])
    with pytest.raises(ValidationError, match="top_p"):
        engine.generate(HI, Sampling(top_p=0))
    with pytest.raises(ValidationError, match="role 'robot'"):
        engine.generate([{"role": "robot", "content": "x"}], GREEDY)


def test_one_generation_at_a_time() -> None:
    engine = ScriptedEngine([10, 11, 2])
    first = engine.generate(HI, GREEDY)
    next(first)
    with pytest.raises(BusyError):
        next(engine.generate(HI, GREEDY))
    first.close()
    assert _collect(engine.generate(HI, GREEDY))[0] == "The answer"


def test_the_engine_is_free_once_its_tokens_end_before_done_is_taken() -> None:
    """The server answers on Done and may get the next request before it pulls the generator past
    Done: by then the engine must be idle (a race a loaded test box hit as BusyError)."""
    engine = ScriptedEngine([10, 11, 2])
    first = engine.generate(HI, GREEDY)
    items = []
    while not items or not isinstance(items[-1], Done):
        items.append(next(first))
    assert _collect(engine.generate(HI, GREEDY))[0] == "The answer"  # first is not yet exhausted


def test_default_threads_leave_cores_free() -> None:
    import os

    assert 1 <= default_threads() <= max(1, (os.cpu_count() or 2) // 2)


def test_open_engine_checks_its_arguments(tmp_path: Path) -> None:
    from appliance.runtime.engine import Artifact

    artifact = Artifact("x", "gguf", tmp_path / "x.gguf", "unknown")
    with pytest.raises(ValidationError, match="threads"):
        open_engine(artifact, threads=0)
    with pytest.raises(ValidationError, match="context_length"):
        open_engine(artifact, context_length=8)
    with pytest.raises(ValidationError, match="unknown artifact kind"):
        open_engine(Artifact("x", "bin", tmp_path, "unknown"))


# -- resolve ---------------------------------------------------------------------------------------
def _export(ws: Workspace, name: str, fmt: str, *, status: str = "ready", passed: bool | None = True) -> Path:
    with ws.writer("export", name) as w:
        if fmt == "gguf":
            (w.path / f"{name}.gguf").write_bytes(b"GGUF")
            summary = {"format": "gguf", "file": f"{name}.gguf"}
        elif fmt == "onnx":
            (w.path / "onnx").mkdir()
            (w.path / "onnx" / "model.onnx").write_bytes(b"onnx")
            summary = {"format": "onnx"}
        else:
            (w.path / "config.json").write_text("{}")
            (w.path / "model.safetensors").write_bytes(b"st")
            summary = {"format": "merged"}
        config = {"format": fmt, "run": "demo"} if fmt != "hf" else {"run": "demo"}
        w.commit(config=config, status=status, info={"summary": summary},
                 metrics={"parity": {"passed": passed}} if fmt != "hf" else {})
    return ws.get("export", name).path


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws").ensure()
    _export(ws, "demo-gguf-q8_0", "gguf")
    _export(ws, "demo-onnx-int4", "onnx")
    _export(ws, "demo-gguf-q2_k", "gguf", status="failed", passed=False)
    _export(ws, "demo-merged", "hf")
    return ws


def test_workspace_exports_resolve_with_their_parity(ws: Workspace) -> None:
    gguf = resolve("demo-gguf-q8_0", ws)
    assert (gguf.kind, gguf.parity, gguf.path.name) == ("gguf", "pass", "demo-gguf-q8_0.gguf")
    onnx = resolve("demo-onnx-int4", ws)
    assert (onnx.kind, onnx.parity, onnx.path) == ("onnx", "pass", ws.root / "exports/demo-onnx-int4/onnx")


def test_a_failed_parity_gate_is_refused_unless_allowed(ws: Workspace) -> None:
    failed = ws.root / "exports" / "demo-gguf-q2_k"
    for ref in ("demo-gguf-q2_k", str(failed), str(failed / "demo-gguf-q2_k.gguf")):
        with pytest.raises(RefusedError, match="failed its parity gate") as err:
            resolve(ref, ws)
        assert "--allow-failed-parity" in (err.value.hint or "")
    allowed = resolve("demo-gguf-q2_k", ws, allow_failed_parity=True)
    assert allowed.parity == "fail" and allowed.kind == "gguf"


def test_a_merged_export_is_refused_with_the_export_commands(ws: Workspace) -> None:
    for ref in ("demo-merged", str(ws.root / "exports" / "demo-merged")):
        with pytest.raises(RefusedError, match="HF safetensors model") as err:
            resolve(ref, ws)
        assert "appliance export gguf demo" in (err.value.hint or "")


def test_an_unknown_name_lists_the_exports(ws: Workspace) -> None:
    with pytest.raises(NotFoundError, match="no export named 'nope'") as err:
        resolve("nope", ws)
    assert "demo-gguf-q8_0" in (err.value.hint or "") and "demo-onnx-int4" in (err.value.hint or "")
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve("/no/such/model.gguf", ws)


def test_a_damaged_export_is_caught_by_its_manifest(ws: Workspace) -> None:
    from appliance.errors import IntegrityError

    (ws.root / "exports" / "demo-gguf-q8_0" / "demo-gguf-q8_0.gguf").write_bytes(b"GGUF truncated?")
    with pytest.raises(IntegrityError):
        resolve("demo-gguf-q8_0", ws)


def test_loose_files_and_folders(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert resolve(str(model)) == resolve(str(tmp_path))
    assert resolve(str(model)).name == "m" and resolve(str(model)).parity == "unknown"
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValidationError, match="2 GGUF files") as err:
        resolve(str(tmp_path))
    assert "m.gguf" in (err.value.hint or "")
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"x")
    with pytest.raises(RefusedError, match=r"not a \.gguf file"):
        resolve(str(pickle))
    onnx = tmp_path / "export" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / "model.onnx").write_bytes(b"x")
    assert resolve(str(onnx.parent)).path == resolve(str(onnx)).path == onnx
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    with pytest.raises(RefusedError, match="safetensors"):
        resolve(str(hf))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationError, match="no GGUF file and no ONNX model"):
        resolve(str(empty))


def test_onnx_stream_decoder_gives_back_a_character_cut_at_the_end() -> None:
    """A character split over tokens comes out whole with the token that completes it; cut off
    at the end (max_tokens), it comes out as U+FFFD, as llama.cpp's engine does, not nothing."""
    from tokenizers import Tokenizer

    from appliance.runtime.onnx_engine import stream_decoder

    tokenizer = Tokenizer.from_file(str(Path(__file__).parents[1] / "fixtures" / "smollm2-tokenizer"
                                        / "tokenizer.json"))
    ids = tokenizer.encode("🙂", add_special_tokens=False).ids
    assert len(ids) == 2  # the emoji's four bytes span two tokens
    piece, tail = stream_decoder(tokenizer)
    assert [piece(i) for i in ids] == ["", "🙂"] and tail() == ""
    piece, tail = stream_decoder(tokenizer)
    assert piece(ids[0]) == "" and tail() == "\ufffd"
