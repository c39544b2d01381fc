"""The server under 3,000 idle and slow-drip connections: is a real request still answered fast,
and does the log stay quiet?

A real `appliance serve` (a separate process, the embedded GGUF unless --artifact) is started with
its file-descriptor limit set as a systemd unit would (`--nofile`, soft and hard; default: the
server unit's LimitNOFILE for the default cap). Then, for `--seconds`:
- `--connections` attacker connections from `--addresses` loopback addresses (127.0.0.2, ...), or
  with `--same-address` all from 127.0.0.1, the normal client's own address (on one box every local
  program is 127.0.0.1: the per-client cap must not let one of them lock the others out), each
  send the start of a request head and one more header line every `--drip` seconds, forever; a
  connection the server closes is opened again after `--reconnect` seconds (0: at once, which
  on a 2-core box mostly measures the attacker and the server fighting for the CPU; the attacker
  runs at `--attacker-nice` 10, as a remote attacker would not take the server's CPU);
- one normal chat completion (8 tokens, greedy) per second from 127.0.0.1, timed, and a cheap
  GET /v1/models per second (the server's own response time, without generation);
- `--malformed` malformed requests spread over the run, from 127.0.0.1.
Printed (JSON): the normal requests' latencies and statuses, what the attackers saw (refused with
503, cut with 408 at the header timeout, closed to make room), the server's open connections
(sampled from /metrics) and descriptors (from /proc), its rejections by reason, and the log: lines
written during the run by kind (access lines, rejection lines, anything else) against the number
of rejections.

Usage: .venv/bin/python bench/idle_connections.py [--artifact PATH] [--connections 3000]
       [--addresses 30 | --same-address] [--seconds 30] [--drip 3] [--reconnect 1] [--nofile N]
       [--malformed 300] [--serve-arg=--header-timeout=10 ...]
Targets: every normal request answered 200 in under 1 s; log lines <= rejections.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(ref: str, home: str, port: int, nofile: int, log: Path, extra: list[str]
                 ) -> subprocess.Popen[bytes]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [sys.executable, "-m", "appliance", "--home", home, "serve", ref, "--port", str(port),
           "--threads", "1", "--context", "512", "--allow-failed-parity", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            status, _ = request(port, "GET", "/health", timeout=2)
            if status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start: {log.read_text()}")


def request(port: int, method: str, path: str, body: Any = None, key: str | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


class Attack:
    """`count` slow-drip connections from `addresses` loopback addresses, reopened when closed."""

    def __init__(self, port: int, count: int, sources: list[str], drip: float, reconnect: float,
                 until: float) -> None:
        self.port, self.count, self.drip, self.until = port, count, drip, until
        self.reconnect = reconnect
        self.sources = sources
        self.outcomes: Counter[str] = Counter()
        self.opened = 0

    async def run(self) -> None:
        await asyncio.gather(*(self.one(i) for i in range(self.count)))

    async def one(self, i: int) -> None:
        source = self.sources[i % len(self.sources)]
        await asyncio.sleep(i * 0.002)  # ramp up over a few seconds
        while time.monotonic() < self.until:
            self.outcomes[await self.hold(source)] += 1
            await asyncio.sleep(self.reconnect)

    async def hold(self, source: str) -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(source, 0)), 10)
        except (OSError, TimeoutError):
            return "connect_failed"
        self.opened += 1
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n")
            n = 0
            while time.monotonic() < self.until:
                try:
                    data = await asyncio.wait_for(reader.read(4096), self.drip)
                except TimeoutError:
                    writer.write(b"X-Drip-%d: y\r\n" % n)
                    n += 1
                    continue
                if not data:
                    return "closed_without_answer"  # closed to make room for another client
                return f"answered_{data.split(b' ', 2)[1].decode(errors='replace')}"
            return "held_to_the_end"
        except OSError:
            return "reset"
        finally:
            writer.close()


def malformed(port: int, count: int, until: float, statuses: Counter[str]) -> None:
    garbage = (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"\x16\x03\x01\x00\xff" * 8)
    gap = max((until - time.monotonic()) / max(count, 1), 0.001)
    for i in range(count):
        if time.monotonic() >= until:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(garbage[i % len(garbage)])
                answer = sock.recv(4096)
                statuses[answer.split(b" ", 2)[1].decode() if answer[:5] == b"HTTP/" else "no_answer"] += 1
        except OSError as exc:
            statuses[type(exc).__name__] += 1
        time.sleep(gap)


def normal(port: int, key: str, model: str, until: float, chats: list[dict[str, Any]],
           probes: list[dict[str, Any]]) -> None:
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    while time.monotonic() < until:
        started = time.perf_counter()
        for out, args in ((chats, ("POST", "/v1/chat/completions", body)), (probes, ("GET", "/v1/models"))):
            begun = time.perf_counter()
            try:
                status, _ = request(port, *args, key=key, timeout=60)  # type: ignore[misc]
            except OSError as exc:
                status = type(exc).__name__  # type: ignore[assignment]
            out.append({"status": status, "seconds": time.perf_counter() - begun})
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))


def metrics(port: int) -> list[tuple[str, dict[str, str], float]]:
    from appliance.runtime import service

    _, text = request(port, "GET", "/metrics", timeout=30)
    return service.parse_prometheus(text.decode())


def sample_open(port: int, until: float, samples: list[int]) -> None:
    while time.monotonic() < until:
        try:
            samples.append(int(sum(v for n, _, v in metrics(port) if n == "appliance_connections_open")))
        except OSError:
            samples.append(-1)
        time.sleep(1)


def sample_fds(pid: int, until: float, samples: list[int]) -> None:
    while time.monotonic() < until:
        try:
            samples.append(len(os.listdir(f"/proc/{pid}/fd")))
        except OSError:
            pass
        time.sleep(0.05)


def classify(lines: list[str]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for line in lines:
        kind = "access" if " appliance.access: " in line else \
            "rejection" if " appliance.connections: rejected" in line else "other"
        kinds[kind] += 1
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--addresses", type=int, default=30)
    parser.add_argument("--same-address", action="store_true",
                        help="attack from 127.0.0.1, the normal client's own address")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--drip", type=float, default=3.0)
    parser.add_argument("--reconnect", type=float, default=1.0)
    parser.add_argument("--attacker-nice", type=int, default=10,
                        help="nice value of the attacking thread: remote attackers do not take the "
                             "server's CPU, so on one box they should yield it (0: they compete)")
    parser.add_argument("--nofile", type=int)
    parser.add_argument("--malformed", type=int, default=300)
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra `serve` argument, e.g. --serve-arg=--max-connections=512")
    args = parser.parse_args()
    from appliance import offline, stack
    from appliance.runtime import keys
    from appliance.runtime.limits import DEFAULT_MAX_CONNECTIONS, FD_RESERVE
    from appliance.workspace import Workspace

    offline.install()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker needs its sockets
    nofile = args.nofile or DEFAULT_MAX_CONNECTIONS + FD_RESERVE
    home = tempfile.mkdtemp(prefix="idle-bench-")
    ref = args.artifact or str(stack.default_model_path())
    key = keys.create(Workspace(Path(home)), "bench")
    port, log = free_port(), Path(home) / "server.log"
    proc = start_server(ref, home, port, nofile, log, args.serve_arg)
    try:
        model = json.loads(request(port, "GET", "/v1/models", key=key)[1])["data"][0]["id"]
        request(port, "POST", "/v1/chat/completions",
                {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0}, key)
        baseline: list[dict[str, Any]] = []  # the same requests without the attack, first
        normal(port, key, model, time.monotonic() + 5, baseline, [])
        before = log.read_text(errors="replace").splitlines()
        cpu_before = _cpu_seconds(proc.pid)
        until = time.monotonic() + args.seconds
        sources = ["127.0.0.1"] if args.same_address else \
            [f"127.0.0.{2 + i}" for i in range(args.addresses)]
        attack = Attack(port, args.connections, sources, args.drip, args.reconnect, until)
        answers: list[dict[str, Any]] = []
        probes: list[dict[str, Any]] = []
        bad: Counter[str] = Counter()
        open_samples: list[int] = []
        fds: list[int] = []
        threads = [threading.Thread(target=normal, args=(port, key, model, until, answers, probes)),
                   threading.Thread(target=malformed, args=(port, args.malformed, until, bad)),
                   threading.Thread(target=sample_open, args=(port, until, open_samples)),
                   threading.Thread(target=sample_fds, args=(proc.pid, until, fds))]
        for t in threads:
            t.start()
        if args.attacker_nice:  # Linux nice is per thread: only this one, the attacker's, yields
            os.nice(args.attacker_nice)
        asyncio.run(attack.run())
        for t in threads:
            t.join()
        time.sleep(1.5)  # the rejection log's summary lines (one per 10 s window) may be due
        cpu = _cpu_seconds(proc.pid) - cpu_before
        rejected = {lab.get("reason", ""): int(v) for n, lab, v in metrics(port)
                    if n == "appliance_connections_rejected_total"}
        after = log.read_text(errors="replace").splitlines()
    finally:
        proc.terminate()
        proc.wait(30)
    during = after[len(before):]
    kinds = classify(during)
    seconds = sorted(a["seconds"] for a in answers)
    report = {
        "server_nofile": nofile, "attack_connections": args.connections,
        "attack_sources": "127.0.0.1 (the normal client's own)" if args.same_address
        else f"{len(sources)} (127.0.0.2-{sources[-1]})",
        "seconds": args.seconds, "drip_s": args.drip, "serve_args": args.serve_arg,
        "baseline_p50_s": round(statistics.median(a["seconds"] for a in baseline), 3),
        "baseline_max_s": round(max(a["seconds"] for a in baseline), 3),
        "normal_requests": len(answers),
        "normal_statuses": dict(Counter(str(a["status"]) for a in answers)),
        "normal_p50_s": round(statistics.median(seconds), 3) if seconds else None,
        "normal_max_s": round(seconds[-1], 3) if seconds else None,
        "normal_under_1s": sum(1 for s in seconds if s < 1.0),
        "normal_seconds": [round(a["seconds"], 2) for a in answers],
        "probe_statuses": dict(Counter(str(a["status"]) for a in probes)),
        "probe_p50_s": round(statistics.median(a["seconds"] for a in probes), 3) if probes else None,
        "probe_max_s": round(max(a["seconds"] for a in probes), 3) if probes else None,
        "server_fds_max": max(fds, default=None),
        "attack_reconnect_s": args.reconnect, "attacker_nice": args.attacker_nice,
        "attack_connections_opened": attack.opened,
        "attack_outcomes": dict(attack.outcomes),
        "malformed_statuses": dict(bad),
        "server_open_connections_max": max(open_samples, default=None),
        "server_open_connections_samples": len(open_samples),
        "server_rejections_by_reason": rejected, "server_rejections": sum(rejected.values()),
        "server_cpu_seconds": round(cpu, 1),
        "log_lines_during_run": len(during), "log_bytes_during_run": sum(len(x) + 1 for x in during),
        "log_lines_by_kind": dict(kinds),
        "log_nonaccess_lines_per_rejection": round((kinds["rejection"] + kinds["other"])
                                                   / max(sum(rejected.values()), 1), 4),
        "log_other_lines": [x[:200] for x in during if " appliance.access: " not in x
                            and " appliance.connections: rejected" not in x][:5]}
    report["verdict"] = {
        "every_normal_request_200_under_1s": bool(seconds) and report["normal_under_1s"] == len(answers)
        and set(report["normal_statuses"]) == {"200"},
        "log_at_most_one_line_per_rejection": kinds["rejection"] + kinds["other"] <= sum(rejected.values())}
    print(json.dumps(report, indent=1), flush=True)
    shutil.rmtree(home, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
