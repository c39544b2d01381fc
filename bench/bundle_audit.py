"""Bundles stream, and the audit trail verifies fast: the figures issue 15 asks for.

1. A stand-in export holding one file of --size-mib (default 1024) is bundled, verified and imported
   into a second workspace, each in its own child process; each child reports its peak RSS (VmHWM
   from /proc/self/status: Linux keeps ru_maxrss across exec) and wall time. Target: peak RSS under
   300 MiB for a 1 GiB artifact.
2. An audit log of --lines (default 100,000) keyed, chained lines is verified (median of 3).
   Target: under 2 s.

    .venv/bin/python bench/bundle_audit.py [--size-mib 1024] [--lines 100000] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from appliance import offline; offline.install()
from appliance.workspace import Workspace
from appliance.stages.bundle import create, importer, reader
from appliance.stages.bundle.request import BundleCreateRequest, BundleImportRequest
step, src, dst, out = sys.argv[1:5]
start = time.perf_counter()
if step == "create":
    create.create(Workspace(Path(src)), BundleCreateRequest.make(["big"], out))
elif step == "verify":
    reader.read(Workspace(Path(dst)), Path(out))
else:
    importer.import_bundle(Workspace(Path(dst)), BundleImportRequest.make(out))
wall = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"step": step, "wall_s": round(wall, 2), "peak_rss_mib": round(hwm / 1024, 1)}}))
"""


def _setup(tmp: Path, size_mib: int) -> tuple[Path, Path, Path]:
    sys.path.insert(0, str(ROOT))
    from appliance import signing
    from appliance.workspace import Workspace

    src, dst = Workspace(tmp / "a").ensure(), Workspace(tmp / "b").ensure()
    block = os.urandom(1 << 20)
    with src.writer("export", "big") as w:
        with open(w.path / "model.gguf", "wb") as fh:
            for i in range(size_mib):
                fh.write(block[i % 7:] + block[:i % 7])  # not one repeated block: no dedup anywhere
        w.commit(info={"summary": {"format": "gguf", "type": "bench", "parity": "pass"}})
    key = signing.create(src, "bench")
    pub = tmp / "bench.pub"
    pub.write_bytes(key.pem)
    signing.trust_add(dst, pub, "bench")
    return src.root, dst.root, tmp / "big.bundle"


def bundle_figures(size_mib: int) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as tmp:
        src, dst, out = _setup(Path(tmp), size_mib)
        rows = []
        for step in ("create", "verify", "import"):
            done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), step, str(src),
                                   str(dst), str(out)], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        rows[0]["bundle_mib"] = round(out.stat().st_size / 2**20, 1)
    return rows


def audit_figure(lines: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from appliance import audit
    from appliance.workspace import Workspace

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        ws = Workspace(Path(tmp) / "ws").ensure()
        ws.audit("note", n=0)  # makes the key and the head
        key = audit.load_key(ws.root)
        assert key is not None
        prev = audit.line_hash((ws.root / audit.LOG).read_bytes().rstrip(b"\n"))
        with open(ws.root / audit.LOG, "ab") as fh:
            for seq in range(2, lines + 1):
                raw = audit.seal(key, {"seq": seq, "ts": "2026-12-05T00:00:00+00:00", "user": "bench",
                                       "event": "commit", "kind": "export", "name": f"e{seq}",
                                       "prev": prev})
                fh.write(raw + b"\n")
                prev = audit.line_hash(raw)
        size = (ws.root / audit.LOG).stat().st_size
        with ws.connect() as db:
            audit.read_head(db)
            audit._write_head(db, audit.Head(lines, size, prev))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            verdict = audit.verify(ws.root, ws.connect)
            times.append(time.perf_counter() - start)
            assert verdict.ok and verdict.lines == lines, verdict.findings[:3]
    return {"lines": lines, "log_mib": round(size / 2**20, 1),
            "verify_s_median": round(statistics.median(times), 3),
            "verify_s_all": [round(t, 3) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    bundle = bundle_figures(args.size_mib)
    trail = audit_figure(args.lines)
    head = (f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"load before: {os.getloadavg()[0]:.2f}")
    lines = [f"# Bundles of a {args.size_mib} MiB artifact, and `audit verify` on {args.lines:,} lines", "",
             "Command: `.venv/bin/python bench/bundle_audit.py "
             f"--size-mib {args.size_mib} --lines {args.lines}`",
             head, "", "| step | wall s | peak RSS MiB |", "| --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['wall_s']} | {r['peak_rss_mib']} |" for r in bundle]
    lines += ["", f"bundle file: {bundle[0].get('bundle_mib')} MiB", "",
              f"audit verify: {trail['lines']:,} lines ({trail['log_mib']} MiB), median "
              f"{trail['verify_s_median']} s of 3 ({trail['verify_s_all']})"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
