"""Planning for this machine without torch: a GPU nvidia-smi reports becomes the planner's target,
and `detected_target` asks nvidia-smi first, importing torch only where nvidia-smi is absent (or
CUDA_VISIBLE_DEVICES picks the device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gpus import fake_nvidia_smi

from appliance import gpus
from appliance.stages.train import planner

ROOT = Path(__file__).resolve().parents[2]
TORCH_SENTINEL = planner.GpuSpec("from torch", 1.0, "7.0")
H100 = "0, NVIDIA H100 80GB HBM3, 0, 81559, 0, 9.0\n"  # nvidia-smi's CSV (see test_gpus.py)
OLD_T4 = "0, Tesla T4, 1024, 15360, [N/A], [N/A]\n"      # a driver that reports no compute_cap


def test_spec_for_names_the_gpu_by_its_free_memory_now() -> None:
    [h100] = gpus.parse_gpus(H100)
    spec = planner.spec_for(h100)
    assert spec == planner.GpuSpec("NVIDIA H100 80GB HBM3 (free now)", h100.free_gib, "9.0")
    [t4] = gpus.parse_gpus(OLD_T4)  # no compute capability reported: assume 8.0
    assert planner.spec_for(t4) == planner.GpuSpec("Tesla T4 (free now)", 14.0, "8.0")


def _detect_in_fresh_interpreter(path: Path) -> dict:
    code = ("import json, sys\nfrom appliance.stages.train import planner\nspec = planner.detected_target()\n"
            "print(json.dumps({'spec': spec and [spec.name, spec.memory_gib, spec.compute_capability],"
            " 'torch': 'torch' in sys.modules}))")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "PATH": str(path), "PYTHONPATH": str(ROOT)}, timeout=120,
                         check=True)
    return json.loads(out.stdout)


def test_detected_target_asks_nvidia_smi_and_never_imports_torch(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path, "echo '0, NVIDIA L4, 2048, 23034, 12, 8.9'\n"
                                        "echo '1, NVIDIA L4, 0, 23034, 0, 8.9'")
    found = _detect_in_fresh_interpreter(bin_dir)
    assert found == {"spec": ["NVIDIA L4 (free now)", (23034 - 2048) / 1024, "8.9"], "torch": False}


def test_nvidia_smi_finding_no_gpu_means_none_without_torch(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path, "echo 'No devices were found'")
    assert _detect_in_fresh_interpreter(bin_dir) == {"spec": None, "torch": False}


def test_without_nvidia_smi_it_falls_back_to_torch(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(planner, "_torch_target", lambda: TORCH_SENTINEL)
    assert planner.detected_target() is TORCH_SENTINEL


def test_cuda_visible_devices_leaves_the_choice_to_cuda(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path, f"printf '{H100}'")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(planner, "_torch_target", lambda: TORCH_SENTINEL)
    assert planner.detected_target() is TORCH_SENTINEL
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert planner.detected_target() == planner.spec_for(gpus.parse_gpus(H100)[0])
