"""Connection-level rules of the HTTP server, as aiohttp's own protocol class with a few hooks.

aiohttp bounds the sizes of a request head's lines and fields and closes a connection that waits
for a request longer than its keep-alive timeout (set to the idle timeout), counted from the
connection or from the previous response, not reset by incoming bytes. What it lacks, and this
module adds (`GuardedHandler`, a `web.RequestHandler` made by `GuardedServer`):
- a header timeout: once a request head starts, it must be complete within `header_timeout`
  seconds, however slowly its bytes drip (answered 408), and at most `MAX_HEAD_BYTES` long (431);
- caps per client (`ConnectionGuard`; an IPv4 address, or an IPv6 /64 prefix, as one host is
  usually given a whole /64) and in total, checked when a connection is made, before anything is
  parsed. At either cap the connection that has waited the longest (for a request, or for the rest
  of a head; of that client at the per-client cap, of anyone at the total cap) is closed to make
  room; only when every one is busy with a request does the new one get a canned 503. So a flood of
  idle or slow-drip connections locks out no real client, not even one on the same address (on a
  single box every local program is 127.0.0.1). A connection whose whole request head has already
  arrived (unread in the socket yet) counts as busy: it is never the one closed;
- parser errors (aiohttp answers them in text or HTML and logs a traceback each) answered with
  the OpenAI-style JSON error body and one rate-limited log line (`limits.RejectLog`);
- no `Server:` header naming Python's and aiohttp's versions.

Refusals and timeouts write a prepared response and half-close, so the client reads the answer
instead of a reset (closing a socket with unread bytes sends a reset, and the client's kernel then
drops the answer): a timeout (408, 431) reads and discards what the client still sends for
`LINGER_S`; a refused connection holds nothing, so it discards what has already arrived and closes
at once (bytes the client sends after that may still meet a reset). A head that passes 32 KiB, or
its header timeout, while a response is still being written on that connection (a pipelining
client) is answered after that response, never inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import socket
import struct
import termios
from collections import OrderedDict
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import LineTooLong

from appliance.runtime.limits import MAX_HEAD_BYTES, RejectLog

LINGER_S = 2.0
REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}
                      ).encode()


def canned(status: int, message: str, code: str, type_: str = "invalid_request_error") -> bytes:
    """A whole HTTP/1.1 response that closes the connection, prepared once."""
    body = error_body(message, type_, code)
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{retry}\r\n")
    return head.encode("ascii") + body


def client_of(peer: Any) -> str:
    """The client's address (no port), as logs show it."""
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "-")


def client_key(address: str) -> str:
    """What the per-client cap counts: an IPv4 address (also when IPv4-mapped, ::ffff:a.b.c.d) as
    itself; an IPv6 address by its /64 prefix ("2001:db8:1:2::/64"), as a host usually holds a
    whole /64 and could otherwise open the cap from each of its addresses; anything else (a Unix
    socket, "-") as it is. A key is its own key."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def unread_request(transport: asyncio.BaseTransport | None) -> bool:
    """Whether the bytes that arrived on the connection's socket and were not read yet hold the
    end of a request head: a client that has just sent its request, about to be served. One
    ioctl when nothing is unread (the usual case); else a peek at them."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        unread = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        if unread <= 0:
            return False
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:  # the socket's own
            # object is asyncio's; a duplicate descriptor peeks at the same bytes
            head = dup.recv(min(unread, MAX_HEAD_BYTES + 4), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return False
    return b"\r\n\r\n" in head


def discard_unread(transport: asyncio.BaseTransport, limit: int = 256 * 1024) -> None:
    """Read and drop what already arrived on a non-blocking socket (up to `limit` bytes), so that
    closing it sends a FIN after the answer rather than a reset that destroys it."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.gettimeout() != 0:
        return
    with contextlib.suppress(OSError):  # BlockingIOError: nothing (more) there
        while limit > 0:
            chunk = os.read(sock.fileno(), min(limit, 65536))
            if not chunk:
                return
            limit -= len(chunk)


class BareResponse(web.Response):
    """A response without the `Server:` header aiohttp adds (for answers made outside the
    application, where its on_response_prepare signal does not run)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


class ConnectionGuard:
    """The server's open connections, in total and by client (`client_key`), oldest activity
    (connection, or the start or end of its latest request) first."""

    def __init__(self, *, max_connections: int, max_per_client: int, header_timeout: float,
                 rejects: RejectLog, metrics: Any) -> None:
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.header_timeout = header_timeout
        self.rejects, self.metrics = rejects, metrics
        self.open: OrderedDict[GuardedHandler, str] = OrderedDict()  # handler -> client key
        self.clients: dict[str, OrderedDict[GuardedHandler, None]] = {}
        self.refusal = canned(503, "the server has too many open connections; try again shortly",
                              "too_many_connections", "server_error")
        self.per_client_refusal = canned(
            503, f"this client already has {max_per_client} open connections, all busy; wait for "
            "one to finish, or reuse it", "too_many_connections", "server_error")

    # -- what tests and metrics read ----------------------------------------------------------
    def open_count(self, client: str | None = None) -> int:
        """All open connections, or those of one client (an address or a `client_key`)."""
        return len(self.open) if client is None else len(self.clients.get(client_key(client), ()))

    def idle_count(self) -> int:
        return sum(1 for h in self.open if h.waiting())

    # -- the rules ------------------------------------------------------------------------------
    def admit(self, handler: GuardedHandler, client: str) -> bytes | None:
        """None when the connection may stay (after closing another to make room, at a cap), else
        the response to close it with. `client` is the address, as logs show it."""
        key = client_key(client)
        mine = self.clients.get(key)
        if (self.max_per_client and mine is not None and len(mine) >= self.max_per_client
                and not self._evict(mine, "client_evicted", "closed while waiting: its client is "
                                    f"at its {self.max_per_client}-connection cap")):
            self.rejected("per_client_limit", client, f"{self.max_per_client} connections open "
                          "from this client, all busy")
            return self.per_client_refusal
        if self.max_connections and len(self.open) >= self.max_connections and not self._evict(
                self.open, "evicted", f"closed while idle: the server is at its "
                f"{self.max_connections}-connection cap"):
            self.rejected("server_limit", client, f"{len(self.open)} connections open, none idle")
            return self.refusal
        self.open[handler] = key
        self.clients.setdefault(key, OrderedDict())[handler] = None
        self.metrics.connections = len(self.open)
        return None

    def _evict(self, among: OrderedDict[GuardedHandler, Any], reason: str, detail: str) -> bool:
        """Close the connection of `among` that has waited the longest (oldest activity first) to
        make room; False when every one is busy."""
        for handler in among:
            if handler.evictable():
                self.release(handler)
                handler.evict()
                self.rejected(reason, handler.client, detail)
                return True
        return False

    def touch(self, handler: GuardedHandler) -> None:
        """A request started or ended on it: it is the most recently active now."""
        key = self.open.get(handler)
        if key is not None:
            self.open.move_to_end(handler)
            self.clients[key].move_to_end(handler)

    def release(self, handler: GuardedHandler) -> None:
        key = self.open.pop(handler, None)
        if key is None:
            return
        mine = self.clients[key]
        mine.pop(handler, None)
        if not mine:
            del self.clients[key]
        self.metrics.connections = len(self.open)

    def rejected(self, reason: str, client: str, detail: str) -> None:
        self.metrics.rejected[reason] += 1
        self.rejects(reason, client, detail)


class GuardedHandler(web.RequestHandler):
    """aiohttp's HTTP protocol under the guard's rules (see the module docstring)."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._client = "-"
        self._state = "new"  # new | admitted | refused | closing | gone
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._payload: Any = None  # the newest request's body stream
        self._deferred: tuple[int, str, str, str, str] | None = None  # _reject's arguments, to
        # answer once the response being written ends

    # -- asyncio protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client = client_of(transport.get_extra_info("peername"))
        refusal = self._guard.admit(self, self._client)
        if refusal is not None:
            self._state = "refused"
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(refusal)
            if transport.can_write_eof():
                transport.write_eof()  # the answer, then FIN
            discard_unread(transport)  # a request already sent must not turn the close into a reset
            transport.close()  # at once: nothing is kept
            return
        self._state = "admitted"
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state != "admitted" or self._deferred is not None:
            return  # refused, answered and closing, or to be: what comes now is discarded
        before = self._request_count
        body = self._payload is not None and not self._payload.is_eof()  # before this data
        super().data_received(data)
        if self._request_count != before:  # a whole head came (or one the parser refused)
            self._head_done()
            return
        if not data or body or self._force_close or self._close:
            return
        self._head_bytes += len(data)
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(self._guard.header_timeout, self._head_late)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._reject_between(431, "header_too_large", f"request head over {MAX_HEAD_BYTES} "
                                 "bytes", "request_header_fields_too_large",
                                 f"the request line and headers are longer than {MAX_HEAD_BYTES} "
                                 "bytes")

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        refused, self._state = self._state == "refused", "gone"
        self._guard.release(self)
        if not refused:
            super().connection_lost(exc)

    async def finish_response(self, request: Any, resp: Any, start_time: float | None
                              ) -> tuple[Any, bool]:
        """After each response: the connection is the most recently active, and an answer held
        back while the response was written (`_reject_between`) goes out now."""
        result = await super().finish_response(request, resp, start_time)
        self._guard.touch(self)
        if self._deferred is not None and not self._messages and self._state == "admitted":
            args, self._deferred = self._deferred, None
            self._reject(*args, counted=True)
        return result

    # -- the rules --------------------------------------------------------------------------------
    @property
    def client(self) -> str:
        return self._client

    def waiting(self) -> bool:
        """Waiting for a request (idle, or a head not yet complete)."""
        return self._state == "admitted" and self._waiter is not None and not self._waiter.done()

    def evictable(self) -> bool:
        """May be closed to make room: has no request being handled or waiting to be (idle since
        its last response, a head not yet complete, or nothing sent yet, including a connection
        made so recently that aiohttp has not started reading it), and no whole request head
        among the bytes that arrived but were not read yet. One already answered (408, 431)
        and lingering so that the client reads the answer may go too."""
        if self._state == "closing":
            return True
        if self._state != "admitted" or self._request_in_progress or self._messages:
            return False
        if self._waiter is not None and self._waiter.done():
            return False  # a request has just come
        return not unread_request(self.transport)

    def evict(self) -> None:
        self._state = "closing"
        self._cancel_head_timer()
        self.force_close()

    def _head_done(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = 0
        self._payload = self._messages[-1][1] if self._messages else None
        self._guard.touch(self)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._state == "admitted" and (self.waiting() or self._request_in_progress):
            seconds = f"{self._guard.header_timeout:g}"
            self._reject_between(408, "header_timeout", f"request head not complete within "
                                 f"{seconds} s", "request_timeout",
                                 f"the request head did not arrive within {seconds} s")

    def _reject_between(self, status: int, reason: str, detail: str, code: str, message: str
                        ) -> None:
        """`_reject` now, or, while a response is being written on this connection, right after
        it (`finish_response`); what the client sends meanwhile is discarded."""
        if not self._request_in_progress:
            self._reject(status, reason, detail, code, message)
            return
        self._cancel_head_timer()
        self._guard.rejected(reason, self._client, detail + " (answered after the response "
                             "in progress)")
        self._deferred = (status, reason, detail, code, message)

    def _reject(self, status: int, reason: str, detail: str, code: str, message: str,
                counted: bool = False) -> None:
        """Answer `status` and close: half-close first and discard what still comes for
        LINGER_S, so the client reads the answer rather than a reset."""
        self._state = "closing"
        self._cancel_head_timer()
        if not counted:
            self._guard.rejected(reason, self._client, detail)
        transport = self.transport
        if transport is None:
            return
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(canned(status, message, code))
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER_S, self.force_close)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    # -- aiohttp's error answers ------------------------------------------------------------------
    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (400), or a failure outside the application's own
        error handling: the OpenAI-style JSON body, one log line (no traceback for a client's
        mistake; a 5xx keeps it, as it is a bug)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started; cannot send the error")
        if status >= 500:
            self.log_exception("error handling a request from %s", self._client, exc_info=exc)
            body = error_body("internal error", "server_error", "internal_error")
        else:
            too_long = isinstance(exc, LineTooLong)
            code = "request_header_fields_too_large" if too_long else "bad_request"
            text = (message or str(exc) or "malformed request").splitlines()[0][:200]
            self._guard.rejected("bad_request", self._client, text)
            body = error_body(f"the request could not be parsed as HTTP: {text}",
                              "invalid_request_error", code)
        response = BareResponse(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class GuardedServer(web.Server):
    """aiohttp's low-level server making `GuardedHandler`s."""

    def __init__(self, guard: ConnectionGuard, base: web.Server, handler_kwargs: dict[str, Any]) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation,
                         loop=asyncio.get_running_loop(), **handler_kwargs)
        self.guard = guard
        self._handler_kwargs = handler_kwargs

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a `GuardedServer` (the application is set up as usual)."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, handler_kwargs: dict[str, Any],
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self._handler_kwargs = handler_kwargs

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # starts and freezes the application
        return GuardedServer(self.guard, base, self._handler_kwargs)
