"""The server against the engine it wraps, and under load.

`speed`: the same greedy generations (a fixed prompt, 128 tokens) run through the engine directly
and through `appliance serve` (one streaming client, a separate process): decode tokens/s and
time to first token for each; the server must keep >= 95% of the direct speed and add < 20 ms.

`load`: 32 concurrent streaming clients for 60 s against the server: every request must complete
or get an explicit 429 (clients back off 0.5 s and retry), no 5xx; p50/p95 latency of completed
requests, tokens/s over the run, and the server's RSS sampled every second (flat after warm-up:
the last third vs the first third after a 10 s warm-up).

Usage: .venv/bin/python bench/server_bench.py [--artifact NAME|PATH] [--home WS] [--mode speed,load]
The default artifact is the demo's Q8_0 export when the workspace has it, else the embedded model.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def default_artifact(home: str | None) -> str:
    from appliance import stack
    from appliance.workspace import Workspace

    ws = Workspace(Path(home) if home else None)
    names = [r.name for r in ws.list("export")] if ws.exists() else []
    return "demo-qlora-gguf-q8_0" if "demo-qlora-gguf-q8_0" in names else str(stack.default_model_path())


def direct(ref: str, home: str | None, runs: int, tokens: int, threads: int) -> list[dict[str, float]]:
    from appliance.runtime import engines
    from appliance.workspace import Workspace

    art = engines.resolve(ref, Workspace(Path(home) if home else None))
    eng = engines.open_engine(art, threads=threads, context_length=1024)
    out = []
    for _ in range(runs + 1):  # the first is a warm-up
        start = time.perf_counter()
        first, count = None, 0
        for item in eng.generate(PROMPT, engines.Sampling(temperature=0, max_tokens=tokens)):
            if isinstance(item, engines.Delta) and item.token_id >= 0:
                first = first or time.perf_counter()
                count += 1
        end = time.perf_counter()
        out.append({"ttft": first - start, "tokens": count, "decode_tps": (count - 1) / (end - first)})
    eng.close()
    return out[1:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(ref: str, home: str, port: int, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "appliance", "--home", home, "serve", ref, "--port", str(port),
           "--threads", str(threads), "--context", "1024", "--allow-failed-parity"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")


def stream(port: int, key: str, model: str, tokens: int, seed: int | None = None) -> dict[str, Any]:
    """One streaming request: status, time to first token, tokens, decode tokens/s, latency."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    if seed is not None:
        body.update(temperature=0.8, seed=seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        conn.close()
        return {"status": resp.status, "latency": time.perf_counter() - start}
    first, count, last = None, 0, start
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        delta = json.loads(line[6:])["choices"]
        if delta and delta[0]["delta"].get("content"):
            now = time.perf_counter()
            first, last = first or now, now
            count += 1
    conn.close()
    end = time.perf_counter()
    return {"status": 200, "ttft": (first or end) - start, "chunks": count, "latency": end - start,
            "decode_tps": (count - 1) / (last - first) if first and count > 1 else 0.0}


def rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in text.splitlines() if ln.startswith("VmRSS")).split()[1]) * 1024


def load(port: int, key: str, model: str, clients: int, seconds: float, pid: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    memory: list[tuple[float, int]] = []
    stop = time.time() + seconds
    t0 = time.time()

    def client(i: int) -> None:
        n = 0
        while time.time() < stop:
            r = stream(port, key, model, 48, seed=i * 1000 + n)
            r["t"] = time.time() - t0
            results.append(r)
            n += 1
            if r["status"] == 429:
                time.sleep(0.5)

    def sampler() -> None:
        while time.time() < stop:
            memory.append((time.time() - t0, rss(pid)))
            time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, memory, time.time() - t0)


def summarize(results: list[dict[str, Any]], memory: list[tuple[float, int]], wall: float
              ) -> dict[str, Any]:
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    done = sorted(r["latency"] for r in results if r["status"] == 200)
    after = [m for t, m in memory if t >= 10]
    third = max(len(after) // 3, 1)
    return {"requests": by_status, "completed": len(done),
            "p50_latency_s": round(statistics.median(done), 3) if done else None,
            "p95_latency_s": round(done[int(0.95 * (len(done) - 1))], 3) if done else None,
            "tokens_per_s": round(sum(r.get("chunks", 0) for r in results) / wall, 1),
            "rss_mib_first_third": round(statistics.mean(after[:third]) / 2**20, 1) if after else None,
            "rss_mib_last_third": round(statistics.mean(after[-third:]) / 2**20, 1) if after else None,
            "rss_mib_max": round(max(m for _, m in memory) / 2**20, 1) if memory else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifact")
    parser.add_argument("--home")
    parser.add_argument("--mode", default="speed,load")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out")
    args = parser.parse_args()
    from appliance import offline
    from appliance.runtime import keys
    from appliance.workspace import Workspace, default_home

    offline.install()
    home = args.home or str(default_home())
    ref = args.artifact or default_artifact(home)
    report: dict[str, Any] = {"artifact": ref, "threads": args.threads, "cpus": os.cpu_count()}
    modes = args.mode.split(",")
    if "speed" in modes:
        report["direct"] = direct(ref, home, args.runs, args.tokens, args.threads)
    ws = Workspace(Path(home))
    key = keys.create(ws, f"bench-{os.getpid()}")
    port = _free_port()
    proc = start_server(ref, home, port, args.threads)
    try:
        model = json.loads(_get(port, key, "/v1/models"))["data"][0]["id"]
        if "speed" in modes:
            stream(port, key, model, args.tokens)  # warm-up
            report["server"] = [stream(port, key, model, args.tokens) for _ in range(args.runs)]
            report["speed"] = compare(report["direct"], report["server"])
            print(json.dumps(report["speed"], indent=1), flush=True)
        if "load" in modes:
            report["load"] = load(port, key, model, args.clients, args.seconds, proc.pid)
            print(json.dumps(report["load"], indent=1), flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
        keys.revoke(ws, f"bench-{os.getpid()}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def _get(port: int, key: str, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    return conn.getresponse().read().decode()


def compare(direct_runs: list[dict[str, float]], server_runs: list[dict[str, Any]]) -> dict[str, Any]:
    d_tps = statistics.median(r["decode_tps"] for r in direct_runs)
    s_tps = statistics.median(r["decode_tps"] for r in server_runs)
    d_ttft = statistics.median(r["ttft"] for r in direct_runs)
    s_ttft = statistics.median(r["ttft"] for r in server_runs)
    return {"direct_decode_tokens_per_s": round(d_tps, 1), "server_decode_tokens_per_s": round(s_tps, 1),
            "server_vs_direct": round(s_tps / d_tps, 3),
            "direct_ttft_ms": round(d_ttft * 1000, 1), "server_ttft_ms": round(s_ttft * 1000, 1),
            "added_ttft_ms": round((s_ttft - d_ttft) * 1000, 1),
            "tokens": [r["tokens"] for r in direct_runs], "chunks": [r["chunks"] for r in server_runs]}


if __name__ == "__main__":
    main()
