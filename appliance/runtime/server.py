"""The OpenAI-compatible HTTP server: `/v1/chat/completions` (streamed as server-sent events or
not), `/v1/models`, `/health` and Prometheus `/metrics`, over the chat engines.

How a request flows: the auth middleware checks the bearer key against the workspace database
(`keys.KeyChecker`), the body is parsed and validated into messages and `Sampling` (every mistake
is a 4xx with an OpenAI-style error body naming the field), then the request waits for its model's
single generation slot. The wait is bounded: when `queue` requests already wait, the answer is 429
at once. The engine runs in the model's own thread and hands each token to the event loop; the
handler writes it to the client as it comes. A client that goes away cancels its handler (aiohttp's
handler cancellation), which sets the generation's cancel event; the slot is released when the
engine thread has actually stopped, so the next request never finds the engine busy.

Errors an engine raises before its first token (a prompt that does not fit the context, a bad
stop string) arrive before any byte of the response is written, so even a streamed request gets a
plain 400 for them.

Limits: request bodies above `max_body` get 413, and one that has not arrived within `body_timeout`
408; `max_tokens` above the server's cap gets 400; with no `max_tokens` the answer is capped at
`max_tokens_default` (and by the context). Connections have deadlines and caps of their own
(`appliance.runtime.connections`, `appliance.runtime.limits`).

Each request writes one access-log line (`appliance.access`, INFO): client, method, path, status,
key name, model, prompt and completion tokens, seconds. Never the messages or the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from appliance.errors import ApplianceError, ValidationError
from appliance.runtime import DEFAULT_PORT, limits
from appliance.runtime.connections import ConnectionGuard, GuardedRunner
from appliance.runtime.engine import ChatEngine, ContextOverflow, Delta, Done, Sampling
from appliance.runtime.keys import KeyChecker
from appliance.runtime.metrics import Metrics

log = logging.getLogger("appliance.server")
access = logging.getLogger("appliance.access")
MODEL_KEY = web.RequestKey("model_name", str)
KEY_NAME = web.RequestKey("key_name", str)
TOKENS = web.RequestKey("tokens", tuple)
PROBES = ("/health", "/metrics")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {"tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
               "function_call": "function calling", "logprobs": "logprobs", "top_logprobs": "logprobs",
               "audio": "audio output", "modalities": "other modalities"}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body: int = 1024 * 1024  # bytes of JSON per request
    max_messages: int = 512
    max_tokens: int = 2048  # the most a request may ask for
    max_tokens_default: int = 512  # what a request without max_tokens gets
    queue: int = 16  # requests that may wait per model; one more gets 429
    header_timeout: float = limits.DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = limits.DEFAULT_IDLE_TIMEOUT
    body_timeout: float = limits.DEFAULT_BODY_TIMEOUT
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS  # 0: no cap
    max_connections_per_client: int = limits.DEFAULT_MAX_CONNECTIONS_PER_CLIENT  # 0: no cap
    protect_metrics: bool = False  # /health and /metrics need a key too


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.close = close  # the connection cannot go on (a body left half-read)

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        response = web.json_response(body, status=self.status)
        if self.close:
            response.force_close()
        return response


@dataclass
class Model:
    """One served artifact: its engine, the thread it generates in, and its bounded wait line."""

    name: str
    engine: ChatEngine
    info: dict[str, Any] = field(default_factory=dict)
    slot: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))
    waiting: int = 0
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="engine"))


@dataclass
class Request:
    model: Model
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool
    include_usage: bool
    cap: int  # tokens after which the server stops the answer with finish_reason "length"


# -- request parsing ---------------------------------------------------------------------------
def _content(value: Any, i: int) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content")
    _utf8(value, f"messages[{i}].content")
    return value


def _utf8(text: str, param: str) -> None:
    """JSON can carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} is not valid Unicode text ({exc.reason} at {exc.start})",
                       param=param) from None


def parse_messages(value: Any, limit: int) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    if len(value) > limit:
        raise ApiError(400, f"messages has {len(value)} entries; at most {limit}", param="messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"messages[{i}].role is {role!r}; supported roles: system, user, assistant",
                           param=f"messages[{i}].role")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), i)})
    if out[-1]["role"] == "assistant":
        raise ApiError(400, "the last message is the assistant's; end with a user message",
                       param="messages")
    return out


def _optional(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if value is not None and wrong:
        raise ApiError(400, f"{name} must be {what}, not {value!r}", param=name)
    return value


def parse_sampling(body: dict[str, Any], config: ServerConfig) -> tuple[Sampling, int]:
    """The sampling settings and the token cap the server enforces."""
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"{name}: {what} is not supported by this server", param=name)
    n = _optional(body, "n", (int,), "an integer")
    if n not in (None, 1):
        raise ApiError(400, "n must be 1 (one choice per request)", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        if _optional(body, name, (int, float), "a number") not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported; use repeat_penalty (1 = off)", param=name)
    if body.get("logit_bias") is not None and not isinstance(body["logit_bias"], dict):
        raise ApiError(400, "logit_bias must be an object mapping token ids to numbers from -100 "
                       "to 100", param="logit_bias")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported",
                       param="response_format")
    max_tokens = _optional(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", (int,), "an integer")
    if max_tokens is not None and not 1 <= max_tokens <= config.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows 1 to {config.max_tokens}",
                       param="max_tokens")
    def given(name: str, default: Any) -> Any:  # OpenAI clients send null for "not set"
        value = body.get(name)
        return default if value is None else value

    penalty = given("repeat_penalty", given("repetition_penalty", 1.0))
    values = {"temperature": given("temperature", 1.0), "top_p": given("top_p", 1.0),
              "top_k": given("top_k", 0), "repeat_penalty": penalty, "max_tokens": max_tokens,
              "seed": body.get("seed"), "stop": body.get("stop") or (),
              "logit_bias": body.get("logit_bias")}
    try:
        sampling = Sampling(**values).validated()
    except ValidationError as exc:
        param = (exc.hint or "").split(":")[0] or None
        raise ApiError(400, _plain(exc), param=param) from None
    for text in sampling.stop:
        _utf8(text, "stop")
    return sampling, max_tokens or min(config.max_tokens_default, config.max_tokens)


def _plain(exc: ApplianceError) -> str:
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


def parse_request(raw: bytes, models: dict[str, Model], config: ServerConfig) -> Request:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ApiError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "model is required (a string: see GET /v1/models)", param="model")
    if name not in models:
        raise ApiError(404, f"the model {name!r} does not exist; served: {', '.join(models)}",
                       param="model", code="model_not_found")
    messages = parse_messages(body.get("messages"), config.max_messages)
    sampling, cap = parse_sampling(body, config)
    stream = _optional(body, "stream", (bool,), "true or false") or False
    options = _optional(body, "stream_options", (dict,), "an object") or {}
    return Request(models[name], messages, sampling, stream, bool(options.get("include_usage")), cap)


# -- generation -----------------------------------------------------------------------------------
class Generation:
    """Runs one request's generation in its model's thread; `items()` yields Delta/Done as they
    come. The first item (or the error raised before it) is awaited before any response byte."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.cancel = threading.Event()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.future: asyncio.Future[None] | None = None
        self.capped = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.future = loop.run_in_executor(self.request.model.executor, self._produce, loop)

    def _produce(self, loop: asyncio.AbstractEventLoop) -> None:
        put = self.queue.put_nowait
        try:
            r = self.request
            for item in r.model.engine.generate(r.messages, r.sampling, self.cancel):
                loop.call_soon_threadsafe(put, item)
        except BaseException as exc:  # handed to the handler, which answers for it
            loop.call_soon_threadsafe(put, exc)

    async def items(self) -> AsyncIterator[Any]:
        """The engine's items, cut at the cap: the engine thread runs ahead of this loop, so
        tokens it made after the cap are dropped and the answer reports exactly `cap` tokens."""
        count, cap, dropped = 0, self.request.cap, False
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Delta):
                if item.token_id >= 0:
                    count += 1
                if count > cap or (dropped and item.token_id < 0):
                    dropped = True
                    continue
                if count == cap and not self.capped:
                    self.capped = True  # the engine stops at its next token ("cancelled")
                    self.cancel.set()
            if isinstance(item, Done) and self.capped and item.reason == "cancelled":
                item = Done("length", item.prompt_tokens, min(item.completion_tokens, cap))
            yield item
            if isinstance(item, Done):
                return


def _error_for(exc: BaseException) -> ApiError:
    if isinstance(exc, ContextOverflow):
        return ApiError(400, _plain(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, ValidationError):
        return ApiError(400, _plain(exc))
    if isinstance(exc, ApplianceError):
        return ApiError(500, f"{exc.title}: {_plain(exc)}", type_="server_error")
    log.exception("generation failed", exc_info=exc)
    return ApiError(500, f"the engine failed: {type(exc).__name__}: {exc}", type_="server_error")


class Server:
    """The aiohttp application over a set of opened engines."""

    def __init__(self, models: dict[str, ChatEngine], keys: KeyChecker | None,
                 config: ServerConfig | None = None, info: dict[str, dict[str, Any]] | None = None
                 ) -> None:
        self.config = config or ServerConfig()
        self.keys = keys
        self.engines = models
        self.info = info or {}
        self.models: dict[str, Model] = {}
        self.metrics = Metrics()
        self.metrics.models = {n: (str(getattr(e, "kind", "?")), "gpu" if getattr(e, "gpu", False) else "cpu")
                               for n, e in self.engines.items()}
        self.created = int(time.time())
        self.guard: ConnectionGuard | None = None  # made by start()

    def app(self) -> web.Application:
        """Build the application (on the loop that will run it: the semaphores bind to it)."""
        self.models = {n: Model(n, e, self.info.get(n, {})) for n, e in self.engines.items()}
        app = web.Application(client_max_size=self.config.max_body,
                              middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model_id}", self.retrieve_model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.on_response_prepare.append(_no_server_header)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _: web.Application) -> None:
        for model in self.models.values():
            model.executor.shutdown(wait=False, cancel_futures=True)

    def make_guard(self, rejects: limits.RejectLog) -> ConnectionGuard:
        config = self.config
        self.guard = ConnectionGuard(
            max_connections=config.max_connections, max_per_client=config.max_connections_per_client,
            header_timeout=config.header_timeout, rejects=rejects, metrics=self.metrics)
        return self.guard

    # -- middlewares ----------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        started, status = time.perf_counter(), 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return exc.response()
        except asyncio.CancelledError:  # the client went away (nginx calls this 499)
            status = 499
            raise
        except web.HTTPException as exc:  # aiohttp's own: 404 route, 405 method, 413 body, ...
            status = exc.status
            code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status)
            message = exc.reason if exc.status != 413 else \
                f"the request body is larger than {self.config.max_body} bytes"
            return ApiError(exc.status, message, code=code).response()
        except Exception as exc:  # a bug: still an OpenAI-style body, and the traceback in the log
            log.exception("unhandled error on %s", request.path)
            return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()
        finally:
            model = request.get(MODEL_KEY, "")
            self.metrics.requests[(_route(request), model, str(status))] += 1
            _access(request, status, time.perf_counter() - started)

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        probe = request.path in PROBES
        if self.keys is not None and (request.path.startswith("/v1/") or
                                      (probe and self.config.protect_metrics)):
            header = request.headers.get("Authorization", "")
            key = header[7:].strip() if header[:7].lower() == "bearer " else None
            name = self._key_name(request, key)
            if name is None:
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY); "
                               "create one with `appliance keys create NAME`", code="invalid_api_key")
            request[KEY_NAME] = name
        return await handler(request)

    def _key_name(self, request: web.Request, key: str | None) -> str | None:
        """The key's name (None: not a valid key); 503 when the key store cannot be read now (out
        of descriptors or disk), logged as one rate-limited line, not a traceback per request."""
        assert self.keys is not None
        try:
            return self.keys.name_of(key)
        except (sqlite3.Error, OSError, ApplianceError) as exc:
            if self.guard is not None:
                self.guard.rejected("key_store_unavailable", request.remote or "-",
                                    f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            raise ApiError(503, "the server cannot check API keys right now; try again shortly",
                           type_="server_error", code="key_store_unavailable") from None

    # -- routes -----------------------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": list(self.models)})

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    def _model_object(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "appliance",
                **self.info.get(name, {})}

    async def list_models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_object(n) for n in self.models]})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model_id"]
        if name not in self.models:
            raise ApiError(404, f"the model {name!r} does not exist; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        request[MODEL_KEY] = name
        return web.json_response(self._model_object(name))

    async def _body(self, http: web.Request) -> bytes:
        """The whole request body, within the body timeout (a slow body holds a connection)."""
        try:
            return await asyncio.wait_for(http.read(), self.config.body_timeout)
        except TimeoutError:
            seconds = f"{self.config.body_timeout:g}"
            if self.guard is not None:
                self.guard.rejected("body_timeout", http.remote or "-",
                                    f"request body not complete within {seconds} s")
            raise ApiError(408, f"the request body did not arrive within {seconds} s",
                           code="request_timeout", close=True) from None
        except (ConnectionError, web.RequestPayloadError) as exc:  # cut short: the client's doing
            if self.guard is not None:
                self.guard.rejected("bad_body", http.remote or "-", f"request body: {exc}"[:200])
            raise ApiError(400, f"the request body ended early or was malformed: {exc}",
                           code="bad_request", close=True) from None

    async def chat(self, http: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        req = parse_request(await self._body(http), self.models, self.config)
        http[MODEL_KEY] = req.model.name
        model = req.model
        if model.slot.locked() and model.waiting >= self.config.queue:
            raise ApiError(429, f"{model.name} has {model.waiting} requests waiting; try again shortly",
                           type_="rate_limit_error", code="rate_limit_exceeded")
        gen = Generation(req)
        await self._acquire(model)
        try:
            gen.start()
            return await self._answer(http, gen, started)
        except asyncio.CancelledError:
            self.metrics.disconnects[model.name] += 1
            raise
        finally:
            gen.cancel.set()  # a no-op when it finished; stops it when the client went away
            self._release_when_done(model, gen)

    async def _acquire(self, model: Model) -> None:
        model.waiting += 1
        self.metrics.queued[model.name] = model.waiting
        try:
            await model.slot.acquire()
        finally:
            model.waiting -= 1
            self.metrics.queued[model.name] = model.waiting
        self.metrics.running[model.name] += 1

    def _release_when_done(self, model: Model, gen: Generation) -> None:
        def release(_: object = None) -> None:
            self.metrics.running[model.name] -= 1
            model.slot.release()

        if gen.future is None or gen.future.done():
            release()
        else:  # chat() has set its cancel: the engine thread stops at its next token
            gen.future.add_done_callback(release)

    async def _answer(self, http: web.Request, gen: Generation, started: float) -> web.StreamResponse:
        items = gen.items()
        try:
            first = await items.__anext__()
        except Exception as exc:  # raised before the first token: a plain error answer
            raise _error_for(exc) from None
        self.metrics.ttft.observe((gen.request.model.name,), time.perf_counter() - started)
        if gen.request.stream:
            response = await self._stream(http, gen, first, items)
        else:
            response = await self._whole(http, gen, first, items)
        self.metrics.latency.observe((gen.request.model.name,), time.perf_counter() - started)
        return response

    def _count(self, http: web.Request, model: str, done: Done) -> None:
        self.metrics.tokens[(model, "prompt")] += done.prompt_tokens
        self.metrics.tokens[(model, "completion")] += done.completion_tokens
        http[TOKENS] = (done.prompt_tokens, done.completion_tokens)

    async def _whole(self, http: web.Request, gen: Generation, first: Any, items: Any) -> web.Response:
        parts, done = [], first
        if isinstance(first, Delta):
            parts.append(first.text)
            try:
                async for item in items:
                    if isinstance(item, Delta):
                        parts.append(item.text)
                    done = item
            except Exception as exc:  # mid-answer engine failure: an error body, not a traceback
                raise _error_for(exc) from None
        assert isinstance(done, Done)
        self._count(http, gen.request.model.name, done)
        body = {**self._envelope(gen, "chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "logprobs": None, "finish_reason": done.reason}],
                "usage": _usage(done)}
        return web.json_response(body)

    async def _stream(self, http: web.Request, gen: Generation, first: Any, items: Any
                      ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await response.prepare(http)
        envelope = self._envelope(gen, "chat.completion.chunk")
        model = gen.request.model.name

        def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
            data = {**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": reason}]}
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        pending = [chunk({"role": "assistant", "content": ""})]
        item = first
        try:
            while True:
                if isinstance(item, Done):
                    break
                if item.text:
                    pending.append(chunk({"content": item.text}))
                if pending and gen.queue.empty():  # behind the engine: send what is ready at once
                    await response.write(b"".join(pending))
                    pending.clear()
                item = await items.__anext__()
        except ConnectionResetError:  # the client closed the stream: stop generating for it
            self.metrics.disconnects[model] += 1
            return response
        except Exception as exc:  # mid-stream engine failure: say so in the stream, then end it
            error = _error_for(exc)
            await response.write(b"".join(pending) + b"data: " + json.dumps({"error": {
                "message": error.message, "type": error.type, "code": error.code}}).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            return response
        self._count(http, model, item)
        tail = [*pending, chunk({}, item.reason)]
        if gen.request.include_usage:
            tail.append(b"data: " + json.dumps({**envelope, "choices": [], "usage": _usage(item)}).encode()
                        + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        await response.write(b"".join(tail))
        await response.write_eof()
        return response

    def _envelope(self, gen: Generation, obj: str) -> dict[str, Any]:
        model = gen.request.model
        return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": obj, "created": int(time.time()),
                "model": model.name, "system_fingerprint": f"appliance-{model.engine.kind}"}


def _route(request: web.Request) -> str:
    """The path label of a request: its route's pattern (`/v1/models/{model_id}`), so a client
    cannot make a label per URL; "other" for what no route matched."""
    route = request.match_info.route
    if isinstance(route, web.ResourceRoute) and route.resource is not None:
        return route.resource.canonical
    return "other"


def _access(request: web.Request, status: int, seconds: float) -> None:
    """The access-log line: who asked what and how it went, never the conversation's text."""
    if not access.isEnabledFor(logging.INFO):
        return
    path = request.raw_path.split("?", 1)[0][:200]  # raw: no decoded control characters
    prompt, completion = request.get(TOKENS, ("-", "-"))
    access.info('%s "%s %s" %d key=%s model=%s prompt=%s completion=%s %.3fs', request.remote or "-",
                request.method, path, status, request.get(KEY_NAME, "-"), request.get(MODEL_KEY, "-") or "-",
                prompt, completion, seconds)


async def _no_server_header(_: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall("Server", None)  # aiohttp's names its and Python's versions


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


# -- running it -------------------------------------------------------------------------------------
async def start(server: Server) -> tuple[web.AppRunner, int]:
    """Start serving on the configured address (port 0: any free port); returns the bound port.
    The connection cap is fitted to the descriptor limit first (said in the log when it shrinks)."""
    loop = asyncio.get_running_loop()
    cap, backlog, note = limits.fit_connections(server.config.max_connections)
    if note:
        log.warning(note)
        server.config = replace(server.config, max_connections=cap)
    config = server.config
    rejects = limits.RejectLog(schedule=loop.call_later)
    loop.set_exception_handler(limits.accept_errors(rejects))
    handler_kwargs = {"keepalive_timeout": config.idle_timeout, "access_log": None,
                      "max_line_size": 8190, "max_field_size": 8190, "max_headers": 64,
                      "lingering_time": 2.0}
    runner = GuardedRunner(server.app(), server.make_guard(rejects), handler_kwargs,
                           handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=backlog)
    await site.start()
    sock = next(iter(runner.addresses))
    return runner, int(sock[1])


class ServerThread:
    """The server on a background thread with its own event loop (tests, benchmarks, the TUI)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="appliance-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner, self.port = self.loop.run_until_complete(start(self.server))
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.port}"

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
