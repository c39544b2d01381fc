"""The OpenAI-compatible server on loopback over the real SmolLM2 GGUF: the official `openai` client
(streamed and not), and raw HTTP for every error path (401, 404, 405, 413, 400s, 429) — each answer
an OpenAI-style error body, never a 500."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from appliance import stack
from appliance.runtime import engines, keys, server
from appliance.workspace import Workspace
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def live(module_tmp: ModuleTemp) -> Iterator[tuple[server.ServerThread, str, str]]:
    ws = Workspace(module_tmp.mktemp("serve") / "ws").ensure()
    key = keys.create(ws, "tests")
    art = engines.resolve(str(stack.default_model_path()), ws)
    eng = engines.open_engine(art, threads=2, context_length=512)
    config = server.ServerConfig(port=0, max_body=64 * 1024, max_tokens=256, queue=1)
    with server.ServerThread(server.Server({art.name: eng}, keys.KeyChecker(ws), config)) as st:
        yield st, key, art.name
    eng.close()


def _client(live: tuple[server.ServerThread, str, str]) -> openai.OpenAI:
    st, key, _ = live
    return openai.OpenAI(base_url=st.url + "/v1", api_key=key, max_retries=0)


def test_models_and_health(live: tuple[server.ServerThread, str, str]) -> None:
    st, _, name = live
    assert [m.id for m in _client(live).models.list().data] == [name]
    status, body = _raw(st, "GET", "/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["models"] == [name]


def test_chat_not_streamed(live: tuple[server.ServerThread, str, str]) -> None:
    _, _, name = live
    reply = _client(live).chat.completions.create(model=name, messages=QUESTION, temperature=0,
                                                  max_tokens=48)
    choice = reply.choices[0]
    assert "4" in choice.message.content and choice.finish_reason == "stop"
    assert "<|im_end|>" not in choice.message.content
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens < 48


def test_streamed_equals_not_streamed(live: tuple[server.ServerThread, str, str]) -> None:
    _, _, name = live
    client = _client(live)
    whole = client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=48)
    parts, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(model=name, messages=QUESTION, temperature=0,
                                                max_tokens=48, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(parts) == whole.choices[0].message.content
    assert reasons[-1] == "stop" and usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_and_seeded_sampling(live: tuple[server.ServerThread, str, str]) -> None:
    _, _, name = live
    client = _client(live)
    short = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    poem = [{"role": "user", "content": "Write a short poem about rain."}]
    runs = [client.chat.completions.create(model=name, messages=poem, temperature=1.0, top_p=0.9,
                                           seed=7, max_tokens=24).choices[0].message.content
            for _ in range(2)]
    assert runs[0] == runs[1]


def _raw(st: server.ServerThread, method: str, path: str, body: bytes | None = None,
         key: str | None = "", headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=60)
    hdrs = dict(headers or {})
    if key:
        hdrs["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=hdrs)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else {}


def _post(live: tuple[server.ServerThread, str, str], payload: object | bytes, key: str | None = None
          ) -> tuple[int, dict]:
    st, good, _ = live
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _raw(st, "POST", "/v1/chat/completions", body, key=good if key is None else key,
                headers={"Content-Type": "application/json"})


def _error(status: int, body: dict, expected: int, *words: str) -> None:
    assert status == expected, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"] or word in (error["code"] or "") or word in (error["param"] or ""), \
            error


def test_error_paths(live: tuple[server.ServerThread, str, str]) -> None:
    st, _, name = live
    ok = {"model": name, "messages": QUESTION, "max_tokens": 4}
    _error(*_post(live, ok, key="apk_00000000_" + "x" * 43), 401, "invalid_api_key")
    _error(*_raw(st, "GET", "/v1/models", key=None), 401, "API key")
    _error(*_post(live, b"{not json"), 400, "invalid_json")
    _error(*_post(live, [1, 2]), 400, "JSON object")
    _error(*_post(live, {**ok, "model": "nope"}), 404, "model_not_found")
    _error(*_post(live, {"messages": QUESTION}), 400, "model")
    _error(*_post(live, {**ok, "messages": []}), 400, "messages")
    _error(*_post(live, {**ok, "messages": [{"role": "tool", "content": "x"}]}), 400, "messages[0].role")
    _error(*_post(live, {**ok, "messages": [{"role": "user", "content": 5}]}), 400, "content")
    _error(*_post(live, {**ok, "messages": [{"role": "user"}]}), 400, "content")
    _error(*_post(live, {**ok, "temperature": "hot"}), 400, "temperature")
    _error(*_post(live, {**ok, "top_p": 0}), 400, "top_p")
    _error(*_post(live, {**ok, "max_tokens": 100000}), 400, "max_tokens")
    _error(*_post(live, {**ok, "n": 2}), 400, "n")
    _error(*_post(live, {**ok, "tools": [{"type": "function"}]}), 400, "tools")
    _error(*_post(live, {**ok, "stream": "yes"}), 400, "stream")
    _error(*_post(live, {**ok, "messages": [{"role": ["user"], "content": "x"}]}), 400, "role")
    _error(*_post(live, b"[" * 50000), 400, "invalid_json")  # nested too deeply for the parser
    _error(*_post(live, b'{"seed": ' + b"1" * 5000 + b"}"), 400, "invalid_json")
    _error(*_post(live, b'{"model": "%s", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
                  % name.encode()), 400, "Unicode")
    assert _post(live, {**ok, "temperature": None, "top_p": None, "seed": None})[0] == 200  # null = unset
    long = [{"role": "user", "content": "word " * 600}]  # > the 512-token context
    _error(*_post(live, {**ok, "messages": long}), 400, "context_length_exceeded")
    _error(*_post(live, {**ok, "messages": long, "stream": True}), 400, "context_length_exceeded")
    _error(*_post(live, {**ok, "messages": [{"role": "user", "content": "x" * 70000}]}), 413,
           "larger than")
    _error(*_raw(st, "GET", "/v1/chat/completions", key=live[1]), 405, "method_not_allowed")
    _error(*_raw(st, "GET", "/v1/nothing", key=live[1]), 404, "not_found")
    _error(*_raw(st, "GET", "/v1/nothing"), 401, "invalid_api_key")  # no key: nothing is revealed
    metrics = _text(st, "/metrics")
    assert 'status="500"' not in metrics and 'status="400"' in metrics


def _text(st: server.ServerThread, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=30)
    conn.request("GET", path)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_revoked_key_is_refused_without_restart(live: tuple[server.ServerThread, str, str],
                                                tmp_path: Path) -> None:
    st, _, name = live
    ws = st.server.keys.ws
    other = keys.create(ws, "short-lived")
    assert _post(live, {"model": name, "messages": QUESTION, "max_tokens": 2}, key=other)[0] == 200
    keys.revoke(ws, "short-lived")
    _error(*_post(live, {"model": name, "messages": QUESTION, "max_tokens": 2}, key=other), 401,
           "invalid_api_key")


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(
        live: tuple[server.ServerThread, str, str]) -> None:
    """queue=1: one request generating, one waiting, the third gets 429. A streaming client that
    hangs up mid-answer frees the slot: a request after it is served."""
    st, key, name = live
    long = {"model": name, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 200, "temperature": 0, "stream": True}
    first = _open_stream(st, key, long)  # generating
    time.sleep(0.2)
    results: list[tuple[int, dict]] = []
    waiter = threading.Thread(target=lambda: results.append(_post(live, {**long, "stream": False})))
    waiter.start()
    deadline = time.time() + 10
    while st.server.models[name].waiting < 1 and time.time() < deadline:
        time.sleep(0.02)
    _error(*_post(live, {**long, "stream": False}), 429, "rate_limit_exceeded")
    first.close()  # hang up mid-stream
    waiter.join(120)
    assert results and results[0][0] == 200
    assert _post(live, {"model": name, "messages": QUESTION, "max_tokens": 4})[0] == 200
    assert 'appliance_client_disconnects_total{model="' in _text(st, "/metrics")


def _open_stream(st: server.ServerThread, key: str, payload: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", st.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload).encode(),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(8).startswith(b"data: ")  # generation has started (chunked, decoded)
    return conn


def test_server_cap_without_max_tokens_and_an_empty_queue(live: tuple[server.ServerThread, str, str]
                                                          ) -> None:
    """With no max_tokens the answer is cut at the server's cap exactly (the engine thread runs
    ahead; extra tokens are dropped, usage says the cap), and queue=0 still serves an idle model."""
    st, key, name = live
    config = server.ServerConfig(port=0, max_tokens=5, queue=0)
    with server.ServerThread(server.Server(st.server.engines, keys.KeyChecker(st.server.keys.ws),
                                           config)) as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key=key, max_retries=0)
        story = [{"role": "user", "content": "Tell me a long story."}]
        reply = client.chat.completions.create(model=name, messages=story, temperature=0)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
        streamed = [c.choices[0].finish_reason for c in client.chat.completions.create(
            model=name, messages=story, temperature=0, stream=True) if c.choices]
        assert streamed[-1] == "length"


def test_retrieve_one_model(live: tuple[server.ServerThread, str, str]) -> None:
    st, key, name = live
    model = _client(live).models.retrieve(name)
    assert (model.id, model.object, model.owned_by) == (name, "model", "appliance")
    assert isinstance(model.created, int)
    status, body = _raw(st, "GET", f"/v1/models/{name}", key=key)
    assert status == 200 and body == {"id": name, "object": "model", "created": model.created,
                                      "owned_by": "appliance"}
    _error(*_raw(st, "GET", "/v1/models/nope", key=key), 404, "model_not_found")
    _error(*_raw(st, "GET", f"/v1/models/{name}", key=None), 401, "invalid_api_key")


def test_logit_bias_changes_the_greedy_answer(live: tuple[server.ServerThread, str, str]) -> None:
    """-100 on the token greedy decoding picks first moves the answer off it; +100 on another
    token makes that one come first; bad maps are refused with 400 naming logit_bias."""
    st, _, name = live
    eng = st.server.engines[name]
    first = next(d.token_id for d in eng.generate(QUESTION, engines.Sampling(temperature=0, max_tokens=1))
                 if isinstance(d, engines.Delta))
    client = _client(live)

    def answer(**extra: object) -> str:
        return client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=6,
                                              **extra).choices[0].message.content

    plain = answer()
    banned = answer(logit_bias={str(first): -100})
    assert banned != plain
    piece = eng._encode(" Paris")[-1]  # a token the model would not start with
    assert piece != first
    forced = next(d for d in eng.generate(QUESTION, engines.Sampling(
        temperature=0, max_tokens=1, logit_bias=((piece, 100.0),))) if isinstance(d, engines.Delta))
    assert forced.token_id == piece
    assert answer(logit_bias={str(piece): 100}).startswith(forced.text)
    ok = {"model": name, "messages": QUESTION, "max_tokens": 2}
    for bad, word in (({"abc": 1}, "logit_bias"), ({"5": 101}, "-100"), ({"5": "x"}, "logit_bias"),
                      ([5], "logit_bias"), ({str(10**7): 1}, "vocabulary"), ({"-1": 1}, "logit_bias")):
        _error(*_post(live, {**ok, "logit_bias": bad}), 400, word)
    assert _post(live, {**ok, "logit_bias": None})[0] == 200
