"""The GPUs of this machine as nvidia-smi reports them, without importing torch.

Importing torch costs seconds and hundreds of MiB, too much for a UI that polls the GPUs or a CLI
that only wants a memory plan. `nvidia-smi --query-gpu ... --format=csv,noheader,nounits` answers in
milliseconds with what both need: each GPU's name, memory in use and in total, load and compute
capability. Fields a driver does not report ("[N/A]") come back as None; a missing or failing
nvidia-smi means no GPUs, with the reason in words.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

GPU_FIELDS = "index,name,memory.used,memory.total,utilization.gpu,compute_cap"
NVIDIA_SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class GpuStatus:
    index: int
    name: str
    memory_used_mib: float
    memory_total_mib: float
    utilization_pct: float | None = None
    compute_capability: str | None = None

    @property
    def free_gib(self) -> float:
        return (self.memory_total_mib - self.memory_used_mib) / 1024


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_gpus(csv_text: str) -> list[GpuStatus]:
    """Rows of `nvidia-smi --query-gpu=GPU_FIELDS --format=csv,noheader,nounits`."""
    gpus = []
    for line in csv_text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        cap = cells[5] if len(cells) > 5 and _number(cells[5]) is not None else None
        gpus.append(GpuStatus(int(cells[0]), cells[1], _number(cells[2]) or 0.0,
                              _number(cells[3]) or 0.0,
                              _number(cells[4]) if len(cells) > 4 else None, cap))
    return gpus


def has_nvidia_smi() -> bool:
    return shutil.which("nvidia-smi") is not None


def _query(fields: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)


def read_gpus() -> tuple[list[GpuStatus], str]:
    """The GPUs nvidia-smi reports, or none and the reason."""
    if not has_nvidia_smi():
        return [], "no GPU (nvidia-smi not found): training runs on the CPU"
    try:
        out = _query(GPU_FIELDS)
        if out.returncode != 0:  # drivers before compute_cap existed
            out = _query(GPU_FIELDS.removesuffix(",compute_cap"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"no GPU: nvidia-smi failed ({exc})"
    if out.returncode != 0:
        return [], f"no GPU: nvidia-smi says {out.stderr.strip() or out.stdout.strip()}"[:160]
    gpus = parse_gpus(out.stdout)
    return gpus, "" if gpus else "no GPU found by nvidia-smi"
