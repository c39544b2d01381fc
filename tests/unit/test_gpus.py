"""The GPUs of this machine from nvidia-smi's CSV, never from torch: parsing recorded output, the
reasons given when there is no GPU, and an old driver without the compute_cap field."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import gpus

# `nvidia-smi --query-gpu=<GPU_FIELDS> --format=csv,noheader,nounits` on an H100 (recorded), and a
# driver that reports some fields as not available.
H100 = "0, NVIDIA H100 80GB HBM3, 0, 81559, 0, 9.0\n"
PARTIAL = "0, Tesla T4, 1024, 15360, [N/A], [N/A]\n1, Tesla T4, 0, 15360, 3, 7.5\n"


def fake_nvidia_smi(folder: Path, script: str) -> Path:
    """An `nvidia-smi` in `folder` that runs `script` (sh), for tests that put it on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
    exe.chmod(0o755)
    return folder


def test_parse_gpus() -> None:
    [h100] = gpus.parse_gpus(H100)
    assert (h100.name, h100.memory_total_mib, h100.compute_capability) == \
        ("NVIDIA H100 80GB HBM3", 81559.0, "9.0")
    assert round(h100.free_gib, 1) == 79.6
    first, second = gpus.parse_gpus(PARTIAL)
    assert first.utilization_pct is None and first.compute_capability is None
    assert second.index == 1 and second.utilization_pct == 3.0


def test_parse_gpus_skips_what_is_not_a_gpu_row() -> None:
    text = "No devices were found\n\n0, Tesla T4, 512, 15360\n"
    [t4] = gpus.parse_gpus(text)
    assert (t4.index, t4.memory_used_mib, t4.utilization_pct, t4.compute_capability) == \
        (0, 512.0, None, None)


def test_no_nvidia_smi_means_no_gpu_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus.shutil, "which", lambda _: None)
    assert gpus.read_gpus() == ([], "no GPU (nvidia-smi not found): training runs on the CPU")


def test_reads_the_gpus_nvidia_smi_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, f"printf '{PARTIAL}'")))
    found, note = gpus.read_gpus()
    assert [g.index for g in found] == [0, 1] and note == ""


def test_a_driver_without_compute_cap_is_asked_again_without_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    script = 'case "$1" in *compute_cap*) echo "Field compute_cap is not valid" >&2; exit 2;; esac\n' \
             "echo '0, Tesla T4, 1024, 15360, 7'"
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, script)))
    found, note = gpus.read_gpus()
    assert found == [gpus.GpuStatus(0, "Tesla T4", 1024.0, 15360.0, 7.0, None)] and note == ""


def test_a_failing_nvidia_smi_says_what_it_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = "echo 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2; exit 9"
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, script)))
    assert gpus.read_gpus() == ([], "no GPU: nvidia-smi says NVIDIA-SMI has failed because it could "
                                    "not communicate with the driver")
