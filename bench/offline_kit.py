"""The air-gapped install of a profile, measured: build a kit (the one networked step), then inside a
network namespace with no network (`unshare -n`, root) install it into a fresh venv and run the
profile's job under `strace -f -e trace=connect`: for `full`, `appliance demo` (import, train,
merge, export, parity, chat); for `edge`, importing the default model and one chat turn.

Prints a Markdown record: kit size per part, build and install times, the job's wall time, the
venv's size, and every connect() beyond loopback (there must be none). CI runs the edge profile as
a test (tests/integration/test_offline_kit.py); the full profile's demo takes minutes, so it is
recorded here (bench/results/offline-kit.md).

    sudo .venv/bin/python bench/offline_kit.py --profile full [--kit EXISTING_KIT]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance import kit, offline, stack  # noqa: E402

JOBS = {
    "full": '"$A" demo > "$OUT/job.txt" 2>&1',
    "edge": ('"$A" models import --default > "$OUT/job.txt" 2>&1\n'
             "printf 'Name a colour.\\n/exit\\n' | \"$A\" chat --max-tokens 8 --temperature 0 "
             '"$MODEL_ID" >> "$OUT/job.txt" 2>&1'),
}
SCRIPT = """set -eu
ip link set lo up
t0=$(date +%s.%N)
"$KIT/install.sh" "$VENV" > "$OUT/install.txt" 2>&1
t1=$(date +%s.%N)
export APPLIANCE_HOME="$WS"
A="$VENV/bin/appliance"
"$A" doctor > "$OUT/doctor.txt" 2>&1 || true
{job}
t2=$(date +%s.%N)
echo "$t0 $t1 $t2" > "$OUT/times.txt"
"""


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=tuple(JOBS), default="full")
    ap.add_argument("--kit", type=Path, help="use this kit instead of building one")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="offline-kit-"))
    kit_dir, build_s = args.kit, None
    if kit_dir is None:
        kit_dir = work / "kit"
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "appliance" / "kit.py"), "build", str(kit_dir),
                        "--profile", args.profile, "--share", str(stack.share_dir())], check=True)
        build_s = time.perf_counter() - t
    manifest = kit.verify(kit_dir, profile=args.profile)
    out, trace = work / "out", work / "connect.trace"
    out.mkdir()
    env = {**os.environ, "KIT": str(kit_dir), "VENV": str(work / "venv"), "WS": str(work / "ws"),
           "OUT": str(out), "MODEL_ID": stack.DEFAULT_MODEL_NAME, "PIP_CONFIG_FILE": os.devnull}
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    script = SCRIPT.format(job=JOBS[args.profile])
    run = subprocess.run(["unshare", "-n", "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
                          "sh", "-c", script], env=env, capture_output=True, text=True)
    t0, t1, t2 = (float(x) for x in (out / "times.txt").read_text().split()) if run.returncode == 0 \
        else (0.0, 0.0, 0.0)
    beyond = offline.connects_beyond_loopback(trace.read_text())
    sizes = manifest["contents"]["bytes"]
    print(f"## {args.profile} profile kit, {time.strftime('%Y-%m-%d')}\n")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"- kit: {kit.describe(manifest)}; wheels {_mib(sizes['wheels'])}, share (converter + default "
          f"model) {_mib(sizes['share'])}, {len(manifest['contents']['wheels'])} wheels")
    if build_s is not None:
        print(f"- build (pip cache warm): {build_s:.0f} s")
    if run.returncode != 0:
        print(f"- FAILED (exit {run.returncode}):\n```\n{run.stdout[-3000:]}{run.stderr[-3000:]}\n```")
        for name in ("install.txt", "job.txt"):
            if (out / name).is_file():
                print(f"\n{name}:\n```\n{(out / name).read_text()[-3000:]}\n```")
        return 1
    venv = _mib(_du(work / "venv"))
    print(f"- install from the kit into a fresh venv, no network: {t1 - t0:.0f} s; venv {venv}")
    print(f"- the profile's job ({'appliance demo' if args.profile == 'full' else 'import + one chat turn'})"
          f", no network: {t2 - t1:.0f} s")
    print(f"- connect() beyond loopback under strace -f: {len(beyond)}")
    for line in beyond[:10]:
        print(f"  - `{line}`")
    tail = "\n".join((out / "job.txt").read_text().splitlines()[-15:])
    print(f"\nthe job's last lines:\n```\n{tail}\n```")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not beyond else 1


if __name__ == "__main__":
    raise SystemExit(main())
