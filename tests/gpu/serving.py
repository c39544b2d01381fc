"""`appliance serve --gpu` in a child process for the GPU tests, and the one request they make.

Shared by the GGUF and the ONNX GPU tests (stdlib only: imported before llama.cpp loads, see
docs/PITFALLS.md "GPU runtime")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(artifact: Path, home: Path) -> Iterator[tuple[str, str]]:
    """(url, key) of `appliance serve ARTIFACT --gpu` on loopback, stopped on exit."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    key = subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), "keys", "create", "gpu"],
                         capture_output=True, text=True, check=True, env=env).stdout.strip()
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "--home", str(home), "serve", str(artifact),
                             "--gpu", "--port", str(port), "--context", "2048"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                said = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"serve exited {proc.returncode}: {said}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.5)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ask_on_the_gpu(url: str, key: str, messages: list[dict[str, str]]) -> str:
    """One greedy request; checks /v1/models and /metrics name the GPU; returns the answer."""
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    models = json.load(urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=auth)))
    assert [m["device"] for m in models["data"]] == ["gpu"]
    body = json.dumps({"model": models["data"][0]["id"], "messages": messages, "temperature": 0,
                       "max_tokens": 32}).encode()
    answer: dict[str, Any] = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers=auth), timeout=120))
    metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
    assert 'device="gpu"' in metrics
    return str(answer["choices"][0]["message"]["content"])
