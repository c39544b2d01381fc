"""What the dashboard shows about this box: CPU, RAM, GPUs, disk and offline status, as plain data.

Read without torch (importing it would cost seconds and hundreds of MiB in a UI process): GPUs come
from `nvidia-smi --query-gpu ... --format=csv` (`appliance.gpus`), CPU and RAM from psutil, disk from
the workspace's file system. The app takes the probe as a parameter, so tests and snapshots pass fixed
numbers.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The GPU query is the core's (`appliance.gpus`, the planner uses it too); these names stay here.
from appliance.gpus import GPU_FIELDS, GpuStatus, parse_gpus, read_gpus
from appliance.workspace import Workspace

__all__ = ["GPU_FIELDS", "GpuStatus", "Probe", "SystemStatus", "parse_gpus", "read_gpus", "read_system"]


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
