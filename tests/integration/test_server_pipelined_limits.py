"""The request-head rules while a response is on its way: a client that pipelines the start of its
next request during an answer, and lets that head grow past the 32 KiB limit, must get the whole
answer first and the 431 after it, never a 431 written into the middle of a streamed answer.

A real aiohttp server over a stand-in engine that holds its answer until the test lets it go, so
the head is known to arrive while the answer is open (no timing)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from appliance.runtime import keys, server, service
from appliance.runtime.engine import Delta, Done, Sampling
from appliance.runtime.limits import MAX_HEAD_BYTES
from appliance.workspace import Workspace


class HeldEngine:
    """Says "Hello", then waits for `go` before " world" and the end."""

    name, kind, context_length, vocab_size = "held", "gguf", 512, 100

    def __init__(self) -> None:
        self.go = threading.Event()

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [1, 2, 3]

    def generate(self, messages: Sequence[dict[str, str]], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Delta | Done]:
        yield Delta("Hello", 5)
        self.go.wait(60)
        yield Delta(" world", 6)
        yield Done("stop", 3, 2)

    def close(self) -> None:
        pass


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[server.ServerThread, HeldEngine, str]]:
    ws = Workspace(tmp_path / "ws").ensure()
    key = keys.create(ws, "tests")
    engine = HeldEngine()
    config = server.ServerConfig(port=0, idle_timeout=60.0, header_timeout=60.0)
    with server.ServerThread(server.Server({"held": engine}, keys.KeyChecker(ws), config)) as st:
        yield st, engine, key
        engine.go.set()


def rejected(st: server.ServerThread, reason: str) -> float:
    with socket.create_connection(("127.0.0.1", st.port), timeout=30,
                                  source_address=("127.0.0.9", 0)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    text = raw.partition(b"\r\n\r\n")[2].decode()
    return sum(v for n, lab, v in service.parse_prometheus(text)
               if n == "appliance_connections_rejected_total" and lab.get("reason") == reason)


def test_a_head_over_the_limit_during_an_answer_is_refused_after_the_answer(
        held: tuple[server.ServerThread, HeldEngine, str]) -> None:
    st, engine, key = held
    body = json.dumps({"model": "held", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", st.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    raw = b""
    while b"Hello" not in raw:  # the answer has started; the engine holds the rest
        raw += sock.recv(65536)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the next request, pipelined...
    for i in range(MAX_HEAD_BYTES // 2000 + 8):  # ... its head growing past the limit
        sock.sendall(b"X-Big-%d: %s\r\n" % (i, b"y" * 2000))

    def counted() -> bool:
        return rejected(st, "header_too_large") == 1

    for _ in range(1500):  # the server has seen the head pass the limit
        if counted():
            break
        threading.Event().wait(0.02)
    assert counted()
    engine.go.set()
    try:
        while chunk := sock.recv(65536):
            raw += chunk
    except ConnectionResetError:
        pass
    sock.close()
    answer, _, rest = raw.partition(b"0\r\n\r\n")  # the chunked answer's end
    assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 431" not in answer, raw[:2000]
    assert b" world" in answer and b"data: [DONE]" in answer
    assert rest.startswith(b"HTTP/1.1 431 "), rest[:300]
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_header_fields_too_large"
