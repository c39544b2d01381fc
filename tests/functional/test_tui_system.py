"""The dashboard's probe reads GPUs from nvidia-smi's CSV, never from torch."""

from __future__ import annotations

import pytest

from tui import system

# `nvidia-smi --query-gpu=<GPU_FIELDS> --format=csv,noheader,nounits` on an H100 (recorded), and a
# driver that reports some fields as not available.
H100 = "0, NVIDIA H100 80GB HBM3, 0, 81559, 0, 9.0\n"
PARTIAL = "0, Tesla T4, 1024, 15360, [N/A], [N/A]\n1, Tesla T4, 0, 15360, 3, 7.5\n"


def test_parse_gpus() -> None:
    [h100] = system.parse_gpus(H100)
    assert (h100.name, h100.memory_total_mib, h100.compute_capability) == \
        ("NVIDIA H100 80GB HBM3", 81559.0, "9.0")
    assert round(h100.free_gib, 1) == 79.6
    first, second = system.parse_gpus(PARTIAL)
    assert first.utilization_pct is None and first.compute_capability is None
    assert second.index == 1 and second.utilization_pct == 3.0


def test_no_nvidia_smi_means_no_gpu_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system.shutil, "which", lambda _: None)
    assert system.read_gpus() == ([], "no GPU (nvidia-smi not found): training runs on the CPU")
