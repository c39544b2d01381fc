"""The dashboard's probe reads GPUs through the core's nvidia-smi query (`appliance.gpus`, tested in
tests/unit/test_gpus.py), never through torch; CPU, RAM and disk it reads itself."""

from __future__ import annotations

import threading
from collections import namedtuple
from pathlib import Path

import pytest

from appliance import gpus
from appliance.workspace import Workspace
from tui import system


def test_no_nvidia_smi_means_no_gpu_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus.shutil, "which", lambda _: None)
    status = system.read_system(Workspace(tmp_path / "not-yet"))
    assert status.gpus == () and status.gpu_note == "no GPU (nvidia-smi not found): training runs on the CPU"
    assert status.cpu_count >= 1 and status.disk_total_gib > 0


def test_the_gpu_names_stay_importable_from_the_tui() -> None:
    assert system.GpuStatus is gpus.GpuStatus and system.read_gpus is gpus.read_gpus


def test_the_first_cpu_sample_is_not_shown_as_zero(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A first sample compares against nothing: the dashboard shows '…' until a second exists."""
    import psutil

    from tui.screens.dashboard import system_lines

    monkeypatch.setattr(gpus.shutil, "which", lambda _: None)
    samples = iter([_times(10, 90), _times(35, 165)])
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu=False: next(samples))
    monkeypatch.setattr(system, "_cpu", system.CpuSampler(min_interval=3600))
    ws = Workspace(tmp_path / "not-yet")
    first = system.read_system(ws)
    assert first.cpu_percent is None
    cpu = system_lines(first, "/srv").splitlines()[0]
    assert "0.0%" not in cpu and "…" in cpu and "of" in cpu
    assert system.read_system(ws).cpu_percent is None  # right after: still nothing to show
    monkeypatch.setattr(system._cpu, "min_interval", 0.0)  # (as if the next poll had come)
    assert system.read_system(ws).cpu_percent == 25.0


Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


def _times(busy: float, idle: float) -> Times:
    return Times(busy, 0, 0, idle, 0, 0, 0, 0, 0, 0)


def test_cpu_load_is_measured_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes run in worker threads; psutil 7's cpu_percent(None) keeps its last sample per thread,
    so a new thread's first figure was 0.0 whatever the load."""
    import psutil

    samples = iter([_times(20, 80), _times(80, 120)])
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu=False: next(samples))
    sampler = system.CpuSampler(min_interval=0.0)
    seen: list[float | None] = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: seen.append(sampler()))
        thread.start()
        thread.join()
    assert seen == [None, 60.0]  # 60 busy seconds of 100
