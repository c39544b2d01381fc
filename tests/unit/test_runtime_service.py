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


def test_prometheus_text_from_elsewhere_never_breaks_the_reader() -> None:
    text = ('# HELP x\nappliance_requests_total{path="/v1/chat/completions",model="a b}c",'
            'status="200"} 5 1795000000000\nappliance_queue_depth{model="a"} NaN\n'
            'appliance_requests_running{model="a"} +Inf\nbroken{model="unterminated} 1\n'
            'appliance_client_disconnects_total 2\n\n')
    samples = service.parse_prometheus(text)
    assert samples[0] == ("appliance_requests_total", {"path": "/v1/chat/completions",
                                                       "model": "a b}c", "status": "200"}, 5.0)
    assert ("appliance_client_disconnects_total", {}, 2.0) in samples
    assert all(name != "broken" for name, _, _ in samples)
    snap = service.summarize(samples)
    assert snap.models["a b}c"].requests == 5 and "a" not in snap.models  # NaN, +Inf: skipped


def test_probes_ignore_proxies_and_foreign_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    class Proxy(http.server.BaseHTTPRequestHandler):  # answers anything: as if it were our server
        def do_GET(self) -> None:
            body = b'{"status": "ok", "models": ["from-the-proxy"]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    proxy = http.server.HTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        with socket.socket() as sock:  # nothing serves here: the answer may only be "none"
            sock.bind(("127.0.0.1", 0))
            free = sock.getsockname()[1]
        assert service.health(f"http://127.0.0.1:{free}", timeout=2) is None
        with socket.socket() as sock:  # an SSH-like listener: not HTTP at all
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]

            def answer() -> None:
                conn, _ = sock.accept()
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.close()

            threading.Thread(target=answer, daemon=True).start()
            assert service.health(f"http://127.0.0.1:{port}", timeout=2) is None
    finally:
        proxy.shutdown()
    assert service.url_for("::", 80) == "http://[::1]:80"


def test_start_stores_absolute_paths_and_keeps_systemd_hosts_local(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import stack

    ws = Workspace(tmp_path / "ws").ensure()
    started: list[dict] = []
    monkeypatch.setattr(jobs, "start", lambda _ws, kind, params: started.append(params))
    model = stack.default_model_path()
    monkeypatch.chdir(model.parent)
    service.start(ws, service.ServeOptions((model.name,), port=0))
    assert started[0]["artifacts"] == [str(model.resolve())]  # a resume elsewhere finds it
    monkeypatch.setenv("APPLIANCE_JOB_LAUNCHER", "systemd")
    with pytest.raises(ApplianceError, match="hardened units"):
        service.start(ws, service.ServeOptions((model.name,), host="0.0.0.0", port=0))
    service.start(ws, service.ServeOptions((model.name,), port=0))  # loopback: allowed
    assert len(started) == 2
