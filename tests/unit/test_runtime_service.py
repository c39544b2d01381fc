"""The serve job's pieces that need no model: options, addresses, the busy-port check, finding a
job's address in its events, and reading the server's Prometheus text back."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from appliance import jobs
from appliance.errors import ApplianceError, ValidationError
from appliance.runtime import service
from appliance.runtime.metrics import Metrics
from appliance.workspace import Workspace


def test_options_round_trip_and_checks() -> None:
    options = service.ServeOptions(("a", "b"), host=" 0.0.0.0 ", port=9000, threads=2).validated()
    assert options.host == "0.0.0.0" and not options.loopback
    assert service.ServeOptions.from_params({**options.params(), "unknown": 1}) == options
    for bad in ({"port": 70000}, {"port": -1}, {"queue": -1}, {"max_tokens": 0}, {"host": " "}):
        with pytest.raises(ValidationError):
            service.ServeOptions(("a",), **bad).validated()
    with pytest.raises(ValidationError, match="no artifact"):
        service.ServeOptions(()).validated()


def test_url_for_reaches_wildcards_through_loopback() -> None:
    assert service.url_for("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert service.url_for("::1", 81) == "http://[::1]:81"
    assert service.url_for("127.0.0.1", 82) == "http://127.0.0.1:82"


def test_port_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not service.port_free("127.0.0.1", port)
    assert service.port_free("127.0.0.1", port)
    with pytest.raises(ApplianceError, match="cannot listen"):
        service.port_free("192.0.2.1", port)  # TEST-NET: not an address of this machine


def test_running_job_address_comes_from_its_events(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    job = jobs.submit(ws, "serve", service.ServeOptions(("m",), port=0).params())
    assert service.running(ws)[0].url is None
    d = jobs.job_dir(ws, job.id)
    jobs.append_event(d, {"type": "state", "state": "running"})
    jobs.append_event(d, {"type": "log", "message": "loading m"})
    jobs.append_event(d, {"type": "listening", "url": "http://127.0.0.1:4242", "port": 4242})
    found = service.running(ws)[0]
    assert (found.url, found.last, found.options.artifacts) == ("http://127.0.0.1:4242", "loading m", ("m",))
    jobs.append_event(d, {"type": "state", "state": "queued"})  # resumed: not listening yet
    assert service.describe(ws, found.job).url is None


def test_metrics_read_back() -> None:
    m = Metrics()
    m.requests[("/v1/chat/completions", 'we"ird\\name', "200")] += 3
    m.requests[("/v1/chat/completions", "a", "400")] += 1
    m.requests[("/v1/models", "", "401")] += 2
    m.tokens[("a", "prompt")] += 10
    m.tokens[("a", "completion")] += 7
    m.latency.observe(("a",), 0.5)
    m.latency.observe(("a",), 1.5)
    m.ttft.observe(("a",), 0.1)
    m.queued["a"], m.running["a"], m.disconnects["a"] = 2, 1, 4
    snap = service.summarize(service.parse_prometheus(m.render()))
    assert (snap.requests, snap.unauthorized) == (6, 2)
    assert snap.models['we"ird\\name'].requests == 3
    a = snap.models["a"]
    assert (a.requests, a.errors, a.prompt_tokens, a.completion_tokens) == (1, 1, 10, 7)
    assert (a.queued, a.running, a.disconnects) == (2, 1, 4)
    assert a.mean_latency == pytest.approx(1.0) and a.mean_ttft == pytest.approx(0.1)
    assert service.ModelStats().mean_latency is None


def test_health_of_nothing_is_none() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert service.health(f"http://127.0.0.1:{port}", timeout=0.5) is None
    with pytest.raises(ApplianceError, match="no metrics"):
        service.read_metrics(f"http://127.0.0.1:{port}", timeout=0.5)
