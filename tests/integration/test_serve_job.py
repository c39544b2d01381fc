"""The server as a detached job on the real SmolLM2 GGUF: it announces its address, answers a chat
with a key, counts it in /metrics, stops on cancel (and frees its port), starts again on resume,
and refuses a second server on a port in use."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import cli, jobs, stack
from appliance.errors import ApplianceError
from appliance.runtime import keys, service
from appliance.workspace import Workspace

pytestmark = pytest.mark.integration


def _wait(what: str, probe, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _listening(ws: Workspace, job_id: str) -> str | None:
    job = jobs.get(ws, job_id)
    assert job.state in ("queued", "running"), (job.state, job.message)
    return service.describe(ws, job).url


def _chat(url: str, key: str) -> dict:
    body = json.dumps({"model": stack.default_model_path().stem, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hi."}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture
def ws(tmp_path: Path, stop_jobs_after: Callable[[Workspace], Workspace]) -> Workspace:
    return stop_jobs_after(Workspace(tmp_path / "ws").ensure())


def test_serve_job_lifecycle(ws: Workspace) -> None:
    key = keys.create(ws, "tests")
    options = service.ServeOptions((str(stack.default_model_path()),), port=0, threads=1, context=512)
    job = service.start(ws, options)
    url = _wait("the listening event", lambda: _listening(ws, job.id))
    assert service.health(url)["status"] == "ok"
    reply = _chat(url, key)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] > 0
    name = stack.default_model_path().stem
    # the slot frees when the engine thread has stopped, a moment after the answer was sent
    model = _wait("the slot to free", lambda: (m := service.read_metrics(url).models[name]).running == 0
                  and m)
    assert model.requests == 1 and model.completion_tokens == reply["usage"]["completion_tokens"]
    assert model.mean_latency is not None and model.queued == 0

    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(ApplianceError, match="in use"):
        service.start(ws, service.ServeOptions(options.artifacts, port=port))

    jobs.cancel(ws, job.id)
    _wait("the job to stop", lambda: jobs.get(ws, job.id).state == "cancelled", 30)
    assert service.health(url, timeout=0.5) is None and service.port_free("127.0.0.1", port)
    assert service.running(ws) == []
    from appliance import audit  # start and stop are audited, with the key's use count, not the text

    trail = [e for e in audit.entries(ws.root) if e["event"].startswith("server-")]
    assert [e["event"] for e in trail] == ["server-start", "server-stop"]
    assert trail[0]["port"] == port and trail[1]["key_uses"] == {"tests": 1}  # the one chat
    assert audit.verify(ws.root, ws.connect).ok

    jobs.resume(ws, job.id)
    again = _wait("listening after resume", lambda: _listening(ws, job.id))
    assert service.health(again)["status"] == "ok"
    jobs.cancel(ws, job.id)
    _wait("the job to stop again", lambda: jobs.get(ws, job.id).state == "cancelled", 30)


def test_serve_job_fails_clearly_when_its_port_is_taken(ws: Workspace, capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert cli.main(["--home", str(ws.root), "serve", "--detach", "--port", str(port),
                         str(stack.default_model_path())]) != 0
        assert "in use" in capsys.readouterr().err
        # raced: the port is taken after the check; the job fails with the same reason
        job = jobs.submit(ws, "serve", service.ServeOptions((str(stack.default_model_path()),),
                                                            port=port, threads=1).params())
        jobs.spawn(ws, job.id)
        done = _wait("the job to fail", lambda: jobs.get(ws, job.id).state in jobs.TERMINAL and
                     jobs.get(ws, job.id))
    assert done.state == "failed" and "already in use" in done.message
