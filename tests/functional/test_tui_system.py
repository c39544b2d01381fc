"""The dashboard's probe reads GPUs through the core's nvidia-smi query (`appliance.gpus`, tested in
tests/unit/test_gpus.py), never through torch; CPU, RAM and disk it reads itself."""

from __future__ import annotations

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
