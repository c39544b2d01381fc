"""`appliance demo`'s wall time, stage by stage, in a fresh workspace (issue 14: under 5 minutes on a
2-core AVX2 box, set-up excluded).

Runs `appliance --home HOME demo`, stamps every line it prints with the seconds since the start, and
prints the time between the demo's own stage headers (`[k/N] ...`) and the jobs' main steps.

`--emulate-avx2` approximates an AVX2-only CPU on a newer one, for the parts that can be capped:
the appliance reads a copy of /proc/cpuinfo without the AVX-512/AMX/AVX-VNNI flags (so training
picks fp32, as it does on such a box), and torch's own kernels, oneDNN and MKL are capped at AVX2
(`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`). llama.cpp needs no cap:
set-up builds it portable (GGML_NATIVE=OFF: AVX2, FMA, F16C at most). onnxruntime cannot be capped
(its MLAS kernels pick the widest at run time), so its share of the time (the int4 gate and timing)
is an underestimate. Clock speed and memory are this box's.

    PYTHONPATH=. python bench/demo_time.py --home /tmp/demo-time [--emulate-avx2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDE = ("avx512", "amx", "avx_vnni", "avx10")
MARKS = (r"^\[\d/\d\]", r"state -> succeeded", r"computing an importance matrix", r"Final estimate",
         r"exporting .* ONNX", r"measuring the int4 sensitivity", r"int4 layout:",
         r"reference scored", r"^\s+scoring ", r"merging ", r"converting ", r"quantizing ",
         r"step 1/", r"final evaluation .* 0/", r"loading .* \(", r"done in ")


def avx2_env(scratch: Path) -> dict[str, str]:
    """The environment that makes this box look like an AVX2-only one to torch and the appliance."""
    text = Path("/proc/cpuinfo").read_text()
    cut = re.sub(r"^(flags\s*:)(.*)$", lambda m: m[1] + " " + " ".join(
        f for f in m[2].split() if not f.startswith(WIDE)), text, flags=re.M)
    (scratch / "cpuinfo").write_text(cut)
    (scratch / "sitecustomize.py").write_text(
        "import os\nfrom pathlib import Path\nimport appliance.cpus as _c\n"
        "_c.CPUINFO = Path(os.environ['BENCH_CPUINFO'])\n"
        "_c.read_cpu.__defaults__ = (_c.CPUINFO,)\n")  # the default was bound at definition
    path = os.pathsep.join(p for p in (str(scratch), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"BENCH_CPUINFO": str(scratch / "cpuinfo"), "PYTHONPATH": path, "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", type=Path, default=Path("/tmp/demo-time"))
    ap.add_argument("--emulate-avx2", action="store_true")
    ap.add_argument("--log", type=Path, help="write the stamped output here too")
    args = ap.parse_args()
    shutil.rmtree(args.home, ignore_errors=True)
    path = filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    scratch = Path(tempfile.mkdtemp(prefix="demo-time-"))
    if args.emulate_avx2:
        env.update(avx2_env(scratch))
    start = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/appliance"), "--home", str(args.home), "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(f"{time.perf_counter() - start:7.1f} {line.rstrip()}")
    code = proc.wait()
    total = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    if args.log:
        args.log.write_text("\n".join(lines) + "\n")
    marked = [x for x in lines if any(re.search(m, x[8:].strip()) or re.search(m, x[8:]) for m in MARKS)]
    print("\n".join(x[:150] for x in marked))
    print(f"exit {code}; wall {total:.1f} s ({total / 60:.2f} min); "
          f"{'AVX2 emulated' if args.emulate_avx2 else 'this CPU as it is'}")
    sys.exit(code)


if __name__ == "__main__":
    main()
