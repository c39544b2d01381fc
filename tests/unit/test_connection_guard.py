"""The connection caps' rules without sockets (`ConnectionGuard` over stand-in connections): who is
one client (an IPv4 address, an IPv6 /64), which connection is closed to make room at a cap (the
one of that client, or of anyone at the total cap, waiting the longest; never a busy one, nor one
whose request has already arrived), and when a new connection is refused instead."""

from __future__ import annotations

import logging
import socket
import time
from collections import defaultdict
from typing import Any

import pytest

from appliance.runtime.connections import ConnectionGuard, client_key, unread_request
from appliance.runtime.limits import RejectLog


class Conn:
    def __init__(self, client: str, state: str = "waiting") -> None:
        self.client, self.state = client, state  # waiting | busy | arrived (request bytes unread)
        self.evicted = False

    def waiting(self) -> bool:
        return self.state in ("waiting", "arrived")

    def evictable(self) -> bool:
        return self.state == "waiting"

    def evict(self) -> None:
        self.evicted = True


class Metrics:
    def __init__(self) -> None:
        self.connections = 0
        self.rejected: defaultdict[str, int] = defaultdict(int)


def guard(total: int = 0, per_client: int = 0) -> ConnectionGuard:
    return ConnectionGuard(max_connections=total, max_per_client=per_client, header_timeout=10.0,
                           rejects=RejectLog(logging.getLogger("t.guard")), metrics=Metrics())


def admit(g: ConnectionGuard, conn: Conn) -> bytes | None:
    return g.admit(conn, conn.client)  # type: ignore[arg-type]


@pytest.mark.parametrize(("address", "key"), [
    ("127.0.0.1", "127.0.0.1"), ("10.1.2.3", "10.1.2.3"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"), ("2001:db8:1:2:ffff:1:2:3", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"), ("::1", "::/64"), ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"), ("/run/appliance.sock", "/run/appliance.sock"), ("-", "-"),
    ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),  # a key is its own key
])
def test_who_is_one_client(address: str, key: str) -> None:
    assert client_key(address) == key


def test_at_its_cap_a_client_s_longest_waiting_connection_makes_room() -> None:
    g = guard(per_client=3)
    local = [Conn("127.0.0.1") for _ in range(3)]
    other = Conn("127.0.0.2")
    for conn in [other, *local]:
        assert admit(g, conn) is None
    g.touch(local[0])  # a request started or ended on it: the most recently active now
    newcomer = Conn("127.0.0.1")
    assert admit(g, newcomer) is None
    assert [c.evicted for c in local] == [False, True, False] and not other.evicted
    assert g.open_count("127.0.0.1") == 3 and g.open_count() == 4
    assert g.metrics.rejected == {"client_evicted": 1}


def test_busy_connections_and_those_whose_request_arrived_are_never_closed() -> None:
    g = guard(per_client=3)
    conns = [Conn("127.0.0.1", "busy"), Conn("127.0.0.1", "arrived"), Conn("127.0.0.1", "busy")]
    for conn in conns:
        assert admit(g, conn) is None
    refusal = admit(g, Conn("127.0.0.1"))
    assert refusal is not None and refusal.startswith(b"HTTP/1.1 503 ")
    assert b"too_many_connections" in refusal and b"Connection: close" in refusal
    assert not any(c.evicted for c in conns) and g.open_count("127.0.0.1") == 3
    assert g.metrics.rejected == {"per_client_limit": 1}
    conns[1].state = "waiting"  # read, and found to be only the start of a head: now it may go
    assert admit(g, Conn("127.0.0.1")) is None and conns[1].evicted


def test_an_ipv6_slash_64_is_one_client() -> None:
    g = guard(per_client=2)
    first, second = Conn("2001:db8::1"), Conn("2001:db8::2")
    assert admit(g, first) is None and admit(g, second) is None
    assert admit(g, Conn("2001:db8::ffff")) is None and first.evicted  # same /64: at the cap
    assert admit(g, Conn("2001:db8:0:1::1")) is None  # another /64: another client
    assert g.open_count("2001:db8::2") == 2 and g.open_count("2001:db8:0:1::9") == 1


def test_at_the_total_cap_anyone_s_longest_waiting_connection_makes_room() -> None:
    g = guard(total=3, per_client=2)
    a, b, c = Conn("127.0.0.2", "busy"), Conn("127.0.0.3"), Conn("127.0.0.4")
    for conn in (a, b, c):
        assert admit(g, conn) is None
    assert admit(g, Conn("127.0.0.5")) is None and b.evicted and not a.evicted
    for conn in list(g.open):
        conn.state = "busy"  # type: ignore[attr-defined]
    assert admit(g, Conn("127.0.0.6")) is not None
    assert g.metrics.rejected == {"evicted": 1, "server_limit": 1} and g.open_count() == 3


def test_release_forgets_the_connection() -> None:
    g = guard(per_client=1)
    conn = Conn("127.0.0.1", "busy")
    assert admit(g, conn) is None
    g.release(conn)  # type: ignore[arg-type]
    g.release(conn)  # type: ignore[arg-type]  # twice: harmless
    assert g.open_count() == 0 and g.open_count("127.0.0.1") == 0 and g.clients == {}
    assert admit(g, Conn("127.0.0.1", "busy")) is None and g.metrics.connections == 1


class Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


def test_a_whole_request_head_that_arrived_unread_is_seen_without_consuming_it() -> None:
    """What keeps a client that has just sent its request from being closed for room."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        with client, server_side:
            server_side.setblocking(False)
            transport: Any = Transport(server_side)
            assert not unread_request(transport)  # nothing sent yet
            start = b"GET /health HTTP/1.1\r\nHost: x\r\n"
            client.sendall(start)
            wait_unread(server_side, len(start))
            assert not unread_request(transport)  # the start of a head: may be closed
            client.sendall(b"\r\n")
            wait_unread(server_side, len(start) + 2)
            assert unread_request(transport)
            assert server_side.recv(100).startswith(b"GET /health")  # peeked, not consumed
    assert not unread_request(None)


def wait_unread(sock: socket.socket, count: int) -> None:
    for _ in range(500):
        try:
            if len(sock.recv(1000, socket.MSG_PEEK)) >= count:
                return
        except BlockingIOError:
            pass
        time.sleep(0.01)
    pytest.fail(f"{count} bytes never arrived")


def test_the_aiohttp_internals_the_guard_relies_on_are_still_there() -> None:
    """connections.py subclasses aiohttp's protocol and runner and reads some of their private
    state: an aiohttp upgrade that renames any of it must fail here, not in production."""
    from aiohttp import web

    slots: set[str] = set()
    for cls in web.RequestHandler.__mro__:
        slots |= set(getattr(cls, "__slots__", ()))
    for name in ("_waiter", "_messages", "_request_count", "_request_in_progress", "_force_close",
                 "_close", "_loop"):
        assert name in slots or hasattr(web.RequestHandler, name), name
    assert callable(getattr(web.RequestHandler, "finish_response", None))
    assert callable(getattr(web.Response, "_prepare_headers", None))
    assert callable(getattr(web.AppRunner, "_make_server", None))
