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

Limits: request bodies above `max_body` get 413; `max_tokens` above the server's cap gets 400; with
no `max_tokens` the answer is capped at `max_tokens_default` (and by the context).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from appliance.errors import ApplianceError, ValidationError
from appliance.runtime import DEFAULT_PORT
from appliance.runtime.engine import ChatEngine, ContextOverflow, Delta, Done, Sampling
from appliance.runtime.keys import KeyChecker
from appliance.runtime.metrics import Metrics

log = logging.getLogger("appliance.server")
MODEL_KEY = web.RequestKey("model_name", str)
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
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


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return web.json_response(body, status=self.status)


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
              "seed": body.get("seed"), "stop": body.get("stop") or ()}
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
        self.created = int(time.time())

    def app(self) -> web.Application:
        """Build the application (on the loop that will run it: the semaphores bind to it)."""
        self.models = {n: Model(n, e, self.info.get(n, {})) for n, e in self.engines.items()}
        app = web.Application(client_max_size=self.config.max_body,
                              middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _: web.Application) -> None:
        for model in self.models.values():
            model.executor.shutdown(wait=False, cancel_futures=True)

    # -- middlewares ----------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        path = request.path if request.path in ROUTES else "other"
        status = 500
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
            self.metrics.requests[(path, model, str(status))] += 1

    @web.middleware
    async def _auth(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path.startswith("/v1/") and self.keys is not None:
            header = request.headers.get("Authorization", "")
            key = header[7:].strip() if header[:7].lower() == "bearer " else None
            if self.keys.name_of(key) is None:
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY); "
                               "create one with `appliance keys create NAME`", code="invalid_api_key")
        return await handler(request)

    # -- routes -----------------------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": list(self.models)})

    async def prometheus(self, _: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def list_models(self, _: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": self.created, "owned_by": "appliance",
                 **self.info.get(n, {})} for n in self.models]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, http: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        req = parse_request(await http.read(), self.models, self.config)
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
            response = await self._whole(gen, first, items)
        self.metrics.latency.observe((gen.request.model.name,), time.perf_counter() - started)
        return response

    def _count(self, model: str, done: Done) -> None:
        self.metrics.tokens[(model, "prompt")] += done.prompt_tokens
        self.metrics.tokens[(model, "completion")] += done.completion_tokens

    async def _whole(self, gen: Generation, first: Any, items: Any) -> web.Response:
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
        self._count(gen.request.model.name, done)
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
        self._count(model, item)
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


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


# -- running it -------------------------------------------------------------------------------------
async def start(server: Server) -> tuple[web.AppRunner, int]:
    """Start serving on the configured address (port 0: any free port); returns the bound port."""
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, server.config.host, server.config.port)
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
