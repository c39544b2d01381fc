"""The offline guard: non-loopback connections and name lookups fail fast, naming the caller."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance import offline

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost",
                                  "api.localhost", "0.0.0.0", None])
def test_local_hosts_are_allowed(host: str | None) -> None:
    assert offline.is_local_host(host)


@pytest.mark.parametrize("host", ["8.8.8.8", "10.0.0.1", "192.168.1.1", "2001:db8::1",
                                  "huggingface.co", "localhost.evil.com", 1234])
def test_remote_hosts_are_refused(host: object) -> None:
    assert not offline.is_local_host(host)


def test_guard_sets_offline_variables() -> None:
    assert offline.installed()
    for key, value in offline.OFFLINE_ENV.items():
        assert os.environ[key] == value


@pytest.mark.network_probe
def test_connect_to_remote_address_raises_naming_the_caller() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(offline.NetworkBlockedError) as err:
            sock.connect(("93.184.216.34", 443))
    finally:
        sock.close()
    assert "93.184.216.34" in str(err.value)
    assert "test_connect_to_remote_address_raises_naming_the_caller" in str(err.value)


@pytest.mark.network_probe
def test_name_resolution_and_create_connection_are_refused() -> None:
    with pytest.raises(offline.NetworkBlockedError, match=r"resolve 'example\.com'"):
        socket.getaddrinfo("example.com", 443)
    with pytest.raises(offline.NetworkBlockedError):
        socket.create_connection(("example.com", 80), timeout=5)


@pytest.mark.network_probe
def test_udp_sendto_remote_is_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(offline.NetworkBlockedError):
            sock.sendto(b"x", ("1.1.1.1", 53))
    finally:
        sock.close()


def test_loopback_connection_still_works() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        accepted.append(conn.recv(5))
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with socket.create_connection(("localhost", port), timeout=5) as client:
        client.sendall(b"hello")
    thread.join(5)
    server.close()
    assert accepted == [b"hello"]


def test_hub_style_load_fails_fast_without_connecting(tmp_path: Path) -> None:
    """The product path: offline variables set, a hub name that is not local fails at once."""
    from transformers import AutoConfig

    before = len(offline.blocked_attempts)
    started = time.monotonic()
    with pytest.raises(OSError, match=r"(?i)offline|local|cache"):
        AutoConfig.from_pretrained("someorg/not-a-local-model", cache_dir=str(tmp_path))
    assert time.monotonic() - started < 10
    assert len(offline.blocked_attempts) == before  # it never even tried a socket


@pytest.mark.network_probe
def test_library_ignoring_offline_flag_is_stopped_by_the_guard() -> None:
    """A library that makes its own HTTP request, whatever the HF variables say, still cannot
    connect: the guard raises its own error at once, naming the function that tried."""
    import requests

    def fetch_weights() -> None:
        requests.get("https://huggingface.co/someorg/not-local/resolve/main/config.json", timeout=30)

    before = len(offline.blocked_attempts)
    started = time.monotonic()
    with pytest.raises(offline.NetworkBlockedError) as err:
        fetch_weights()
    assert time.monotonic() - started < 5
    assert "huggingface.co" in str(err.value) and "fetch_weights" in str(err.value)
    assert len(offline.blocked_attempts) == before + 1


def test_cli_installs_the_guard(tmp_path: Path) -> None:
    code = ("import socket, sys\n"
            "from appliance import cli\n"
            f"sys.argv = ['appliance', '--home', {str(tmp_path)!r}, 'models', 'list']\n"
            "cli.main()\n"
            "socket.create_connection(('example.org', 80), timeout=5)\n")
    env = {k: v for k, v in os.environ.items() if k not in offline.OFFLINE_ENV}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert "NetworkBlockedError" in out.stderr and "example.org" in out.stderr
