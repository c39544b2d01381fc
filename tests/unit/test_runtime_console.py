"""The console chat's REPL against a fake engine: turns and history, every slash command, the
transcript, Ctrl-C (a real SIGINT) stopping an answer but not the chat, and the context policy
(oldest exchanges dropped, system prompt kept, a notice)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ExitCode
from appliance.runtime import console
from appliance.runtime.console import ChatSession
from appliance.runtime.engine import ContextOverflow, Delta, Done, Sampling

ROOT = Path(__file__).resolve().parents[2]
PER_MESSAGE = 10  # the fake prompt: 10 tokens per message


class FakeEngine:
    """Answers "echo: <last user message>" word by word; records what it was asked."""

    name, kind = "fake-gguf", "gguf"

    def __init__(self, context_length: int = 1000, on_token: Any = None) -> None:
        self.context_length = context_length
        self.calls: list[tuple[list[dict[str, str]], Sampling]] = []
        self.on_token = on_token

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [0] * (PER_MESSAGE * len(messages))

    def generate(self, messages: Sequence[dict[str, str]], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Delta | Done]:
        prompt = len(self.prompt_ids(messages))
        if prompt + (sampling.max_tokens or 1) > self.context_length:
            raise ContextOverflow(prompt, sampling.max_tokens or 0, self.context_length)
        self.calls.append(([dict(m) for m in messages], sampling))
        words = f"echo: {messages[-1]['content']}".split(" ")
        return self._stream(words, prompt, sampling, cancel)

    def _stream(self, words: list[str], prompt: int, sampling: Sampling,
                cancel: threading.Event | None) -> Iterator[Delta | Done]:
        for i, word in enumerate(words):
            if sampling.max_tokens is not None and i == sampling.max_tokens:
                yield Done("length", prompt, i)
                return
            yield Delta(word if i == 0 else " " + word, i)
            if self.on_token:
                self.on_token(i)
            if cancel is not None and cancel.is_set():
                yield Done("cancelled", prompt, i + 1)
                return
        yield Done("stop", prompt, len(words))

    def close(self) -> None:
        pass


class Script:
    """Scripted input lines and captured output/notices."""

    def __init__(self, *lines: str) -> None:
        self.lines = list(lines)
        self.out: list[str] = []
        self.notes: list[str] = []

    def read(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line == "^C":
            raise KeyboardInterrupt
        return line

    def session(self, engine: Any = None, **kw: Any) -> ChatSession:
        return ChatSession(engine or FakeEngine(), kw.pop("sampling", Sampling()), read=self.read,
                           write=self.out.append, notify=self.notes.append, **kw)

    @property
    def text(self) -> str:
        return "".join(self.out)


def test_turns_stream_and_build_the_history() -> None:
    script = Script("Hello there", "", "How are you?")
    engine = FakeEngine()
    session = script.session(engine, system="Be brief.")
    assert session.run() == 0
    assert script.text == "echo: Hello there\necho: How are you?\n"
    last_messages, _ = engine.calls[-1]
    assert last_messages == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hello there"},
                             {"role": "assistant", "content": "echo: Hello there"},
                             {"role": "user", "content": "How are you?"}]
    assert "chatting with fake-gguf" in script.notes[0]


def test_reset_system_and_unknown_commands() -> None:
    script = Script("one", "/reset", "two", "/system", "/system Talk like a pirate.", "/system", "three",
                    "/system -", "four", "/bogus", "//literal slash")
    engine = FakeEngine()
    script.session(engine, system="S").run()
    firsts = [calls[0] for calls, _ in engine.calls]
    assert [len(c) for c, _ in engine.calls] == [2, 2, 4, 5, 7]  # /reset forgot "one"
    assert firsts[1] == {"role": "system", "content": "S"}
    assert firsts[2] == {"role": "system", "content": "Talk like a pirate."}
    assert firsts[3] == {"role": "user", "content": "two"}  # system prompt removed
    assert engine.calls[-1][0][-1] == {"role": "user", "content": "/literal slash"}
    notes = "\n".join(script.notes)
    assert "conversation cleared (system prompt kept)" in notes and "system prompt: 'S'" in notes
    assert "system prompt removed" in notes and "unknown command /bogus" in notes


def test_set_and_settings() -> None:
    script = Script("/set temperature 0", "/set top_k 40", "/set top_p 1.5", "/set top_k many",
                    "/set stop [\"END\", \"###\"]", "/set max_tokens 2", "/set colour blue", "/settings",
                    "a b c d", "/set max_tokens none", "/set stop none", "/set seed 7", "x")
    engine = FakeEngine()
    session = script.session(engine)
    session.run()
    first, second = engine.calls[0][1], engine.calls[1][1]
    assert first == Sampling(temperature=0.0, top_k=40, max_tokens=2, stop=("END", "###"))
    assert second == Sampling(temperature=0.0, top_k=40, seed=7)
    notes = "\n".join(script.notes)
    assert "not set: top_p is 1.5, out of range" in notes and "top_p: greater than 0, at most 1" in notes
    assert "not set: invalid literal" in notes and "usage: /set KEY VALUE" in notes
    assert "settings: temperature=0.0, top_p=1.0, top_k=40, repeat_penalty=1.0, max_tokens=2" in notes
    assert "artifact: fake-gguf (gguf, context 1000, CPU)" in notes
    assert "[stopped: max_tokens reached]" in notes
    assert script.text.startswith("echo: a\n")


def test_save_writes_the_transcript(tmp_path: Path) -> None:
    target = tmp_path / "chat.json"
    (tmp_path / "a-folder").mkdir()
    script = Script("Hi", f"/save {target}", "/save", f"/save {tmp_path / 'a-folder'}", "/quit", "never read")
    session = script.session(system="Be kind.", sampling=Sampling(temperature=0.0, seed=3),
                             artifact="demo-gguf-q8_0")
    assert session.run() == 0
    assert script.lines == ["never read"]
    saved = json.loads(target.read_text(encoding="utf-8"))
    assert saved == {
        "artifact": "demo-gguf-q8_0", "kind": "gguf",
        "settings": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repeat_penalty": 1.0,
                     "max_tokens": None, "seed": 3, "stop": [], "logit_bias": []},
        "system": "Be kind.",
        "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "echo: Hi"}]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "chat.json"]  # no temporary file
    notes = "\n".join(script.notes)
    assert f"transcript saved to {target}" in notes and "usage: /save FILE" in notes
    assert "not saved:" in notes


def test_a_real_sigint_stops_the_answer_but_not_the_chat(tmp_path: Path) -> None:
    def ctrl_c(i: int) -> None:
        if i == 1:
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    script = Script("one two three four five", "^C", "next", f"/save {tmp_path / 't.json'}")
    engine = FakeEngine(on_token=ctrl_c)
    script.session(engine).run()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is only installed while answering
    messages = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert messages[1] == {"role": "assistant", "content": "echo: one", "interrupted": True}
    assert messages[3]["content"] == "echo: next"  # stopped again at its second token
    assert engine.calls[1][0][1] == {"role": "assistant", "content": "echo: one"}  # no mark for the model
    notes = "\n".join(script.notes)
    assert notes.count("[interrupted]") == 2 and "(/quit or Ctrl-D leaves the chat)" in notes


def test_ctrl_c_before_the_answer_starts_drops_the_question() -> None:
    class SlowStart(FakeEngine):
        def generate(self, messages: Sequence[dict[str, str]], sampling: Sampling,
                     cancel: threading.Event | None = None) -> Iterator[Delta | Done]:
            if not self.calls:
                self.calls.append(([], sampling))
                raise KeyboardInterrupt  # e.g. while a long prompt is being tokenized
            return super().generate(messages, sampling, cancel)

    script = Script("first", "second")
    session = script.session(SlowStart())
    assert session.run() == 0
    assert [m["content"] for m in session.messages] == ["second", "echo: second"]
    assert "[interrupted]" in script.notes


def test_context_full_drops_the_oldest_exchanges_and_keeps_the_system_prompt() -> None:
    # 10 tokens per message; room for an answer = max_tokens 15: at most 5 messages with the system
    script = Script("q1", "q2", "q3", "q4")
    engine = FakeEngine(context_length=65)
    script.session(engine, system="S", sampling=Sampling(max_tokens=15)).run()
    sizes = [len(m) for m, _ in engine.calls]
    assert sizes == [2, 4, 4, 4]
    last = engine.calls[-1][0]
    assert last[0] == {"role": "system", "content": "S"} and last[1] == {"role": "user", "content": "q3"}
    notes = [n for n in script.notes if n.startswith("[context full")]
    assert notes == ["[context full: dropped the 2 oldest message(s), kept the system prompt]"] * 2


def test_a_message_too_long_for_the_context_is_an_error_not_a_turn() -> None:
    script = Script("hello", "/settings")
    engine = FakeEngine(context_length=25)
    session = script.session(engine, system="S", sampling=Sampling(max_tokens=10))
    session.run()
    assert engine.calls == [] and session.messages == []
    assert any(n.startswith("error: the prompt is 20 tokens + max_tokens 10") for n in script.notes)


def test_register_builds_the_chat_command() -> None:
    parser = argparse.ArgumentParser()
    console.register(parser.add_subparsers())
    args = parser.parse_args(["chat", "demo-gguf-q8_0", "--system", "Be brief.", "--temperature", "0",
                              "--top-p", "0.9", "--top-k", "40", "--repeat-penalty", "1.1",
                              "--max-tokens", "64", "--seed", "3", "--threads", "2",
                              "--allow-failed-parity"])
    assert args.func is console.cmd_chat and args.artifact == "demo-gguf-q8_0" and args.threads == 2
    assert args.allow_failed_parity and args.system == "Be brief."
    assert console.sampling_from_args(args) == Sampling(0.0, 0.9, 40, 1.1, 64, 3)
    from appliance.errors import ValidationError

    with pytest.raises(ValidationError, match="top_p"):
        console.sampling_from_args(parser.parse_args(["chat", "x", "--top-p", "0"]))


def test_main_reports_errors_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert console.main(["--home", str(tmp_path / "ws"), "chat", "nope"]) == ExitCode.NOT_FOUND
    err = capsys.readouterr().err
    assert "error: Not found: no export named 'nope'" in err and "Traceback" not in err


def test_the_module_imports_only_the_standard_library() -> None:
    code = ("import sys\nimport appliance.runtime.console\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=True)
    loaded = set(run.stdout.split())
    heavy = {"numpy", "jinja2", "tokenizers", "llama_cpp", "onnxruntime", "torch", "transformers"}
    assert not loaded & heavy, sorted(loaded & heavy)
