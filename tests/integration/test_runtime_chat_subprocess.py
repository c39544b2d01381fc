"""`appliance chat` in a child process on a real GGUF (the embedded SmolLM2, the file `make demo`
starts from): turns piped on stdin, /set and /save, and a real SIGINT in the middle of an answer
that stops it, keeps it marked in the transcript, and leaves the chat running."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> Path:
    from appliance import stack

    return stack.default_model_path()


def _chat(model: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "appliance.runtime.console", "chat", str(model),
                             "--threads", "1", *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_piped_turns_and_a_saved_transcript(model: Path, tmp_path: Path) -> None:
    transcript = tmp_path / "chat.json"
    lines = ["What is the capital of France?", "/set max_tokens 6", "Name a colour.",
             f"/save {transcript}", "/quit"]
    proc = _chat(model, "--system", "Answer in one short sentence.", "--temperature", "0")
    out, err = proc.communicate("\n".join(lines).encode() + b"\n", timeout=120)
    assert proc.returncode == 0, err.decode()
    saved = json.loads(transcript.read_text(encoding="utf-8"))
    assert saved["artifact"] == model.stem and saved["kind"] == "gguf"
    assert saved["settings"]["temperature"] == 0.0 and saved["settings"]["max_tokens"] == 6
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    answers = [m["content"] for m in saved["messages"] if m["role"] == "assistant"]
    assert all(answers) and "<|im_end|>" not in "".join(answers)
    assert out.decode() == "".join(a + "\n" for a in answers)  # stdout holds the answers only
    notes = err.decode()
    assert "chatting with" in notes and "max_tokens = 6" in notes and "transcript saved" in notes


def _read_until(proc: subprocess.Popen, wanted: int, timeout: float) -> bytes:
    """Read stdout as it streams until `wanted` bytes came or `timeout` passed."""
    assert proc.stdout is not None
    got, deadline = b"", time.monotonic() + timeout
    while len(got) < wanted and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    return got


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(model: Path, tmp_path: Path) -> None:
    transcript = tmp_path / "chat.json"
    proc = _chat(model, "--temperature", "0.8", "--seed", "1", "--repeat-penalty", "1.2",
                 "--max-tokens", "2000")
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"Write a very long story about a dragon and a knight.\n")
        proc.stdin.flush()
        first = _read_until(proc, 40, timeout=90)
        assert len(first) >= 40, first  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # let the answer stop before the next line arrives
        rest, err = proc.communicate(f"/set max_tokens 8\nSay hello.\n/save {transcript}\n/quit\n".encode(),
                                     timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "[interrupted]" in err.decode()
    messages = json.loads(transcript.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    story, hello = messages[1], messages[3]
    assert story.get("interrupted") is True
    assert len(story["content"]) >= 30 and story["content"].count(" ") < 2000  # partial, kept
    assert "interrupted" not in hello and hello["content"]
    assert (first + rest).decode(errors="replace").startswith(story["content"][:30])
