"""What the dashboard shows about this box: CPU, RAM, GPUs, disk and offline status, as plain data.

Read without torch (importing it would cost seconds and hundreds of MiB in a UI process): GPUs come
from `nvidia-smi --query-gpu ... --format=csv`, CPU and RAM from psutil, disk from the workspace's
file system. The app takes the probe as a parameter, so tests and snapshots pass fixed numbers.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.workspace import Workspace

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


@dataclass(frozen=True)
class SystemStatus:
    cpu_percent: float
    cpu_count: int
    ram_used_gib: float
    ram_total_gib: float
    disk_free_gib: float
    disk_total_gib: float
    gpus: tuple[GpuStatus, ...] = ()
    gpu_note: str = ""                # why there is no GPU list ("nvidia-smi not found", ...)
    offline_guard: bool = False
    offline_env: bool = False
    blocked_attempts: int = 0
    extra: dict[str, str] = field(default_factory=dict)


Probe = Callable[[Workspace], SystemStatus]


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


def _query(fields: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)


def read_gpus() -> tuple[list[GpuStatus], str]:
    """The GPUs nvidia-smi reports, or none and the reason."""
    if shutil.which("nvidia-smi") is None:
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


def _disk(root: Path) -> tuple[float, float]:
    probe = root
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return usage.free / 2**30, usage.total / 2**30


def read_system(ws: Workspace) -> SystemStatus:
    """The live probe (call it from a worker: nvidia-smi can take a while)."""
    import psutil

    from appliance import offline

    mem = psutil.virtual_memory()
    gpus, note = read_gpus()
    free, total = _disk(ws.root)
    status = offline.status()
    return SystemStatus(
        cpu_percent=psutil.cpu_percent(interval=None), cpu_count=psutil.cpu_count() or 1,
        ram_used_gib=(mem.total - mem.available) / 2**30, ram_total_gib=mem.total / 2**30,
        disk_free_gib=free, disk_total_gib=total, gpus=tuple(gpus), gpu_note=note,
        offline_guard=status["guard_installed"], offline_env=status["offline_env"],
        blocked_attempts=status["blocked_attempts"])
