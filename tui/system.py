"""What the dashboard shows about this box: CPU, RAM, GPUs, disk and offline status, as plain data.

Read without torch (importing it would cost seconds and hundreds of MiB in a UI process): GPUs come
from `nvidia-smi --query-gpu ... --format=csv` (`appliance.gpus`), CPU and RAM from psutil, disk from
the workspace's file system. The app takes the probe as a parameter, so tests and snapshots pass fixed
numbers. The CPU figure is the load between two samples (`CpuSampler`): until a second sample
exists it is unknown (None) and the dashboard shows `…`.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The GPU query is the core's (`appliance.gpus`, the planner uses it too); these names stay here.
from appliance.gpus import GPU_FIELDS, GpuStatus, parse_gpus, read_gpus
from appliance.workspace import Workspace

__all__ = ["GPU_FIELDS", "GpuStatus", "Probe", "SystemStatus", "parse_gpus", "read_gpus", "read_system"]


@dataclass(frozen=True)
class SystemStatus:
    cpu_percent: float | None  # None: no second sample yet (the first says nothing)
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


class CpuSampler:
    """The CPU load since the previous sample, from `psutil.cpu_times()` deltas kept here.

    Not `psutil.cpu_percent(None)`: psutil 7 keeps its previous sample per thread, and probes run
    in worker threads, so each new thread's first call compared against nothing and said 0.0
    (seen as a gauge flipping between 100% and 0.0% under full load). The first sample, and one
    taken less than `min_interval` after the last, give the last trusted figure (None at first,
    shown as `…`)."""

    def __init__(self, min_interval: float = 0.5) -> None:
        self.min_interval = min_interval
        self.at: float | None = None
        self.times: tuple[float, float] | None = None  # (busy, total) seconds at `at`
        self.value: float | None = None
        self._lock = threading.Lock()

    def __call__(self) -> float | None:
        with self._lock:
            now = time.monotonic()
            if self.at is not None and now - self.at < self.min_interval:
                return self.value
            busy, total = _busy_total()
            if self.times is not None and total > self.times[1]:
                share = (busy - self.times[0]) / (total - self.times[1])
                self.value = round(min(max(share, 0.0), 1.0) * 100, 1)
            self.at, self.times = now, (busy, total)
            return self.value


def _busy_total() -> tuple[float, float]:
    """CPU seconds busy and in all, as psutil counts them (guest time is already in user)."""
    import psutil

    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


_cpu = CpuSampler()


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

    cpu = _cpu()
    mem = psutil.virtual_memory()
    gpus, note = read_gpus()
    free, total = _disk(ws.root)
    status = offline.status()
    return SystemStatus(
        cpu_percent=cpu, cpu_count=psutil.cpu_count() or 1,
        ram_used_gib=(mem.total - mem.available) / 2**30, ram_total_gib=mem.total / 2**30,
        disk_free_gib=free, disk_total_gib=total, gpus=tuple(gpus), gpu_note=note,
        offline_guard=status["guard_installed"], offline_env=status["offline_env"],
        blocked_attempts=status["blocked_attempts"])
