"""The server against hostile and careless clients, on real aiohttp servers over the real SmolLM2
GGUF: slow-drip and oversized request heads, idle connections, more connections than the caps
(per client address, in total), slow bodies, malformed requests (an OpenAI-style JSON body, one
log line, no traceback), no `Server:` version header, /health and /metrics behind a key when
asked, and one access-log line per request (never the conversation's text).

Client addresses other than 127.0.0.1 are other loopback addresses (127.0.0.2, ...): Linux routes
all of 127.0.0.0/8 to `lo`, so a test can be several clients without leaving the machine."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from appliance import stack
from appliance.runtime import engines, keys, server, service
from appliance.runtime.engine import ChatEngine
from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def setup(module_tmp: ModuleTemp) -> Iterator[tuple[Workspace, str, str, ChatEngine]]:
    ws = Workspace(module_tmp.mktemp("harden") / "ws").ensure()
    key = keys.create(ws, "tests")
    art = engines.resolve(str(stack.default_model_path()), ws)
    eng = engines.open_engine(art, threads=2, context_length=512)
    yield ws, key, art.name, eng
    eng.close()


@contextmanager
def serving(setup: tuple[Workspace, str, str, ChatEngine], **settings: Any) -> Iterator[server.ServerThread]:
    ws, _, name, eng = setup
    config = server.ServerConfig(port=0, **settings)
    with server.ServerThread(server.Server({name: eng}, keys.KeyChecker(ws), config)) as st:
        yield st


def connect(st: server.ServerThread, source: str = "127.0.0.1", timeout: float = 30) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", st.port), timeout=timeout, source_address=(source, 0))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (or the socket's timeout raises)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def openai_error(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = split(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/json"), headers
    assert "server" not in headers, headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def get(st: server.ServerThread, path: str, key: str | None = None, source: str = "127.0.0.1"
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=30, source_address=(source, 0))
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def until(predicate: Any, what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.02)


def metric(st: server.ServerThread, name: str, **labels: str) -> float:
    _, _, body = get(st, "/metrics")
    return sum(v for n, lab, v in service.parse_prometheus(body.decode())
               if n == name and all(lab.get(k) == x for k, x in labels.items()))


# -- request heads ------------------------------------------------------------------------------
def test_a_slow_drip_head_is_cut_at_the_header_timeout(setup: Any) -> None:
    """A client that sends a header line now and then never completes its head: the server answers
    408 and closes at the header timeout, although the client keeps sending (the idle timeout is
    far off)."""
    with serving(setup, header_timeout=1.0, idle_timeout=120.0) as st:
        sock = connect(st)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        for i in range(300):  # at most 60 s of dripping
            try:
                sock.sendall(b"X-Drip-%d: y\r\n" % i)
            except OSError:  # closed under us (reset): read what came
                break
            sock.settimeout(0.2)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(5)
        answer += read_all(sock)
        sock.close()
        openai_error(answer, 408, "request_timeout")
        assert metric(st, "appliance_connections_rejected_total", reason="header_timeout") == 1


def test_a_head_larger_than_the_limit_is_refused(setup: Any) -> None:
    with serving(setup) as st:
        sock = connect(st)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(40):  # 40 x 2 KiB of headers, more than the 32 KiB a head may have
                sock.sendall(b"X-Big-%d: %s\r\n" % (i, b"y" * 2000))
        except OSError:
            pass
        answer = read_all(sock)
        sock.close()
        openai_error(answer, 431, "request_header_fields_too_large")


def test_an_idle_connection_is_closed_at_the_idle_timeout(setup: Any) -> None:
    with serving(setup, idle_timeout=0.5) as st:
        silent = connect(st)  # never sends anything
        assert read_all(silent) == b""
        silent.close()
        kept = connect(st)  # one request on a keep-alive connection, then silence
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = split(read_all(kept))
        assert status == 200 and headers.get("connection", "").lower() != "close"
        kept.close()


def test_a_slow_body_is_cut_at_the_body_timeout(setup: Any) -> None:
    _, key, _, _ = setup
    with serving(setup, body_timeout=1.0) as st:
        sock = connect(st)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 500"
                     b"\r\n\r\n{\"model\":")
        answer = read_all(sock)
        sock.close()
        openai_error(answer, 408, "request_timeout")


# -- connection caps ----------------------------------------------------------------------------
def stuck_in_body(st: server.ServerThread, key: str, source: str = "127.0.0.1") -> socket.socket:
    """A connection busy with a request: its head is in, its body never comes (not idle: it is
    never closed to make room, only at the body timeout)."""
    sock = connect(st, source)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
    return sock


def slow_head(st: server.ServerThread, source: str = "127.0.0.1") -> socket.socket:
    """A slow-drip client: the start of a request head, the rest never comes."""
    sock = connect(st, source)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return sock


def test_connections_beyond_the_per_client_cap_are_refused_when_all_are_busy(setup: Any) -> None:
    _, key, _, _ = setup
    with serving(setup, max_connections_per_client=3, idle_timeout=60.0) as st:
        held = [stuck_in_body(st, key, "127.0.0.2") for _ in range(3)]
        until(lambda: st.server.guard.open_count("127.0.0.2") == 3
              and st.server.guard.idle_count() == 0, "3 busy connections admitted")
        extra = connect(st, "127.0.0.2")
        openai_error(read_all(extra), 503, "too_many_connections")
        extra.close()
        assert get(st, "/health", source="127.0.0.3")[0] == 200  # another client is served
        held.pop().close()
        until(lambda: st.server.guard.open_count("127.0.0.2") == 2, "a closed one is released")
        assert get(st, "/health", source="127.0.0.2")[0] == 200
        for sock in held:
            sock.close()
        assert metric(st, "appliance_connections_rejected_total", reason="per_client_limit") == 1


def test_slow_connections_at_the_per_client_cap_do_not_lock_out_the_same_address(setup: Any) -> None:
    """Everything on one box is 127.0.0.1: a program holding its address's cap of slow-drip
    connections must not deny every other local client. A new connection closes that address's
    connection waiting the longest (idle, or a head not complete) instead of being refused."""
    _, key, name, _ = setup
    with serving(setup, max_connections_per_client=3, idle_timeout=60.0, header_timeout=60.0) as st:
        slow = []
        for i in range(3):
            slow.append(slow_head(st))
            until(lambda n=i + 1: st.server.guard.open_count("127.0.0.1") == n
                  and st.server.guard.idle_count() == n, f"{i + 1} slow connections admitted")
        status, _, body = get(st, "/v1/models", key=key)  # a normal client on the same address
        assert status == 200 and name in body.decode()
        slow[0].settimeout(10)
        assert read_all(slow[0]) == b""  # the one waiting the longest was closed for it
        until(lambda: st.server.guard.open_count("127.0.0.1") == 2, "the normal client is gone")
        conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=60)  # and a chat answer
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": name, "messages": QUESTION, "max_tokens": 4, "temperature": 0}),
            headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"]
        conn.close()
        for sock in slow[1:]:  # the younger slow ones are still open
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            sock.close()
        until(lambda: st.server.guard.open_count() == 0, "all released")
        assert metric(st, "appliance_connections_rejected_total", reason="per_client_limit") == 0
        assert metric(st, "appliance_connections_rejected_total", reason="client_evicted") == 1


def test_a_refused_connection_that_sent_its_request_reads_the_503_not_a_reset(setup: Any) -> None:
    """A client writes its request as soon as it connects, before the server decides: a refusal
    must still reach it as a 503 it can read (closing a socket with unread bytes sends a reset,
    which makes the client's kernel drop the answer)."""
    _, key, _, _ = setup
    with serving(setup, max_connections_per_client=1, idle_timeout=60.0) as st:
        busy = stuck_in_body(st, key, "127.0.0.6")
        until(lambda: st.server.guard.open_count("127.0.0.6") == 1
              and st.server.guard.idle_count() == 0, "a busy connection admitted")
        outcomes = []
        for _ in range(20):
            sock = connect(st, "127.0.0.6", timeout=10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                answer = read_all(sock)
                outcomes.append(split(answer)[0] if answer else "closed")
                if answer:
                    openai_error(answer, 503, "too_many_connections")
            except ConnectionResetError:
                outcomes.append("reset")
            sock.close()
        busy.close()
        assert outcomes == [503] * 20, outcomes


def test_at_the_total_cap_the_longest_idle_connection_makes_room(setup: Any) -> None:
    """Idle (or slow-drip) connections from many addresses fill the server: a new client still gets
    in, by closing the connection idle the longest; busy connections are never closed for it."""
    _, key, name, _ = setup
    with serving(setup, max_connections=4, idle_timeout=60.0) as st:
        idle = []
        for i in range(4):
            idle.append(connect(st, f"127.0.0.{10 + i}"))
            until(lambda n=i + 1: st.server.guard.open_count() == n, f"{i + 1} admitted")
        until(lambda: st.server.guard.idle_count() == 4, "4 idle connections")
        status, _, body = get(st, "/v1/models", key=key, source="127.0.0.1")
        assert status == 200 and name in body.decode()
        idle[0].settimeout(10)
        assert read_all(idle[0]) == b""  # the oldest idle one was closed to make room
        for sock in idle:
            sock.close()
        until(lambda: st.server.guard.open_count() == 0, "all released")

        busy = []  # four requests stuck reading their bodies: not idle, never evicted
        for i in range(4):
            sock = connect(st, f"127.0.0.{20 + i}")
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + key.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
            busy.append(sock)
        until(lambda: st.server.guard.open_count() == 4 and st.server.guard.idle_count() == 0,
              "4 busy connections")
        refused = connect(st, "127.0.0.30")
        openai_error(read_all(refused), 503, "too_many_connections")
        refused.close()
        for sock in busy:
            sock.close()
        until(lambda: st.server.guard.open_count() == 0, "all released")
        assert metric(st, "appliance_connections_rejected_total", reason="evicted") == 1
        assert metric(st, "appliance_connections_rejected_total", reason="server_limit") == 1


# -- malformed requests, headers, logs ---------------------------------------------------------
def test_a_malformed_request_gets_a_json_error_one_log_line_and_no_traceback(
        setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with serving(setup) as st:
        caplog.clear()
        for garbage in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
                        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n"):
            sock = connect(st)
            sock.sendall(garbage)
            openai_error(read_all(sock), 400, "bad_request")
            sock.close()
        records = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "appliance.access"]
        assert 1 <= len(records) <= 3, [r.getMessage() for r in records]
        assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
        assert not [r for r in caplog.records if r.name.startswith("aiohttp")
                    and r.levelno >= logging.WARNING]


def test_no_server_version_header(setup: Any) -> None:
    with serving(setup) as st:
        for path in ("/health", "/v1/models", "/nothing"):
            _, headers, _ = get(st, path)
            assert "server" not in headers, headers


def test_rejections_are_logged_one_line_each_at_most(setup: Any, caplog: pytest.LogCaptureFixture
                                                     ) -> None:
    caplog.set_level(logging.INFO)
    _, key, _, _ = setup
    with serving(setup, max_connections_per_client=1, idle_timeout=60.0) as st:
        keep = stuck_in_body(st, key, "127.0.0.40")  # busy: never closed to make room
        until(lambda: st.server.guard.open_count("127.0.0.40") == 1
              and st.server.guard.idle_count() == 0, "one admitted")
        caplog.clear()
        for _ in range(60):
            sock = connect(st, "127.0.0.40")
            read_all(sock)
            sock.close()
        keep.close()
        rejected = metric(st, "appliance_connections_rejected_total", reason="per_client_limit")
    lines = [r for r in caplog.records if r.name == "appliance.connections"]
    assert rejected == 60 and 1 <= len(lines) <= rejected
    assert len(lines) < 60  # past the burst, they are summed up, not one line each


# -- /health and /metrics -----------------------------------------------------------------------
def test_health_and_metrics_need_a_key_when_protected(setup: Any) -> None:
    _, key, _, _ = setup
    with serving(setup, protect_metrics=True) as st:
        for path in ("/health", "/metrics"):
            status, _, body = get(st, path)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
            assert get(st, path, key=key)[0] == 200
        assert service.health(st.url) is None
        assert service.health(st.url, key=key) is not None
        assert service.read_metrics(st.url, key=key).unauthorized == 3  # 2 above, 1 by health()


def test_unprotected_health_and_metrics_answer_without_a_key(setup: Any) -> None:
    with serving(setup) as st:
        assert get(st, "/health")[0] == 200 and get(st, "/metrics")[0] == 200


# -- access log ---------------------------------------------------------------------------------
def test_one_access_log_line_per_request_without_the_conversation(
        setup: Any, caplog: pytest.LogCaptureFixture) -> None:
    _, key, name, _ = setup
    caplog.set_level(logging.INFO, logger="appliance.access")
    secret = "my secret question about zebras"
    with serving(setup) as st:
        caplog.clear()
        conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": name, "messages": [{"role": "user", "content": secret}], "max_tokens": 6,
            "temperature": 0}), headers={"Authorization": f"Bearer {key}"})
        reply = json.loads(conn.getresponse().read())
        answer, usage = reply["choices"][0]["message"]["content"], reply["usage"]
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        conn.getresponse().read()
        conn.close()
        until(lambda: len([r for r in caplog.records if r.name == "appliance.access"]) >= 2,
              "two access lines")
    lines = [r.getMessage() for r in caplog.records if r.name == "appliance.access"]
    assert len(lines) == 2, lines
    chat, unauthorized = lines
    for part in ('"POST /v1/chat/completions"', " 200 ", "key=tests", f"model={name}",
                 f"prompt={usage['prompt_tokens']} ", f"completion={usage['completion_tokens']} ",
                 "127.0.0.1"):
        assert part in chat, chat
    assert secret not in chat and "zebras" not in chat and (not answer.strip() or answer not in chat)
    for part in ('"GET /v1/models"', " 401 ", "key=-"):
        assert part in unauthorized, unauthorized


def test_a_long_answer_outlives_the_idle_and_header_timeouts(setup: Any) -> None:
    """The timeouts are for waiting clients: a streamed answer that takes longer than both is
    delivered whole, and the connection serves the next request."""
    _, key, name, _ = setup
    with serving(setup, idle_timeout=0.3, header_timeout=0.3) as st:
        conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=120)
        story = {"model": name, "messages": [{"role": "user", "content": "Tell me a long story."}],
                 "max_tokens": 96, "temperature": 0, "stream": True}
        started = time.monotonic()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(story),
                     headers={"Authorization": f"Bearer {key}"})
        events = conn.getresponse().read().decode().split("\n\n")
        took = time.monotonic() - started
        assert events[-2] == "data: [DONE]"
        assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"
        conn.request("GET", "/health")  # the same connection, right after
        assert conn.getresponse().status == 200
        conn.close()
        if took < 0.3:
            pytest.skip(f"the answer took {took:.2f} s: too fast to outlive the timeouts here")


def test_a_body_cut_short_is_one_line_not_a_traceback(setup: Any, caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    _, key, _, _ = setup
    caplog.set_level(logging.INFO)
    with serving(setup) as st:
        sock = connect(st)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + key.encode() + b"\r\nContent-Length: 500\r\n\r\n{\"model\":")
        sock.shutdown(socket.SHUT_WR)  # the client gives up sending
        read_all(sock)
        sock.close()
        until(lambda: metric(st, "appliance_connections_rejected_total", reason="bad_body") == 1,
              "the cut body counted")
        assert metric(st, "appliance_requests_total", status="500") == 0
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# -- request fields -----------------------------------------------------------------------------
def test_a_logit_bias_key_of_thousands_of_digits_is_a_400_naming_the_field(setup: Any) -> None:
    """Python's int() refuses strings of over 4,300 digits with ValueError: that was a 500."""
    _, key, name, _ = setup
    with serving(setup) as st:
        conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": name, "messages": QUESTION, "max_tokens": 2, "logit_bias": {"9" * 5000: 1}}),
            headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        status, body = response.status, response.read()
        conn.close()
        assert status == 400, body[:300]
        error = json.loads(body)["error"]
        assert error["param"] == "logit_bias" and error["type"] == "invalid_request_error"
        assert "logit_bias" in error["message"] and len(error["message"]) < 600
        assert metric(st, "appliance_requests_total", status="500") == 0
