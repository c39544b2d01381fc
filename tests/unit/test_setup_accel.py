"""Set-up's accelerator choice (`scripts/setup.sh --detect`, which installs nothing) and what doctor
says of it: CUDA where nvidia-smi lists a GPU and nvcc can build llama.cpp for it, else the CPU with
the reason; APPLIANCE_ACCEL overrides."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance import doctor

ROOT = Path(__file__).resolve().parents[2]


def _tool(folder: Path, name: str, output: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\n")
    path.chmod(0o755)


def _detect(bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{bin_dir}:/usr/bin:/bin"
    clean = {k: v for k, v in os.environ.items() if k not in ("APPLIANCE_ACCEL", "CUDA_HOME")}
    clean["CUDA_HOME"] = str(bin_dir / "no-cuda")  # not this box's toolkit
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--detect"], text=True,
                          capture_output=True, env={**clean, "PATH": path, **env}, check=False)


def test_the_choice_follows_the_gpu_and_the_compiler(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    assert _detect(bin_dir).stdout == "cpu: no NVIDIA GPU (nvidia-smi lists none)\n"
    _tool(bin_dir, "nvidia-smi", "GPU 0: Tesla T4 (UUID: GPU-1)\\n")
    done = _detect(bin_dir)
    assert done.stdout.startswith("cpu: a GPU is here but no nvcc to build llama.cpp for it")
    _tool(bin_dir, "nvcc", "")
    assert _detect(bin_dir).stdout == f"cuda: nvidia-smi lists 1 GPU(s); nvcc at {bin_dir}/nvcc\n"
    assert _detect(bin_dir, APPLIANCE_ACCEL="cpu").stdout == "cpu: APPLIANCE_ACCEL=cpu\n"
    (bin_dir / "nvidia-smi").unlink()
    done = _detect(bin_dir, APPLIANCE_ACCEL="cuda")
    assert done.returncode == 2 and "APPLIANCE_ACCEL=cuda, but nvidia-smi lists no GPU" in done.stdout
    done = _detect(bin_dir, APPLIANCE_ACCEL="tpu")
    assert done.returncode == 2 and "use cpu, cuda or auto" in done.stdout


def test_doctor_names_a_cuda_set_up_whose_runtimes_lost_the_gpu() -> None:
    cuda = {"accelerator": "cuda", "why": "nvidia-smi lists 1 GPU(s)"}
    fine = {"setup": cuda, "llama_cpp_gpu_offload": True, "onnxruntime_providers": ["CUDAExecutionProvider"]}
    assert doctor._runtime_problems(fine) == []
    lost = {"setup": cuda, "llama_cpp_gpu_offload": False, "onnxruntime_providers": ["CPUExecutionProvider"]}
    assert [p["what"] for p in doctor._runtime_problems(lost)] == \
        ["llama.cpp GPU offload", "onnxruntime CUDA"]
    assert doctor._runtime_problems({**lost, "setup": {"accelerator": "cpu"}}) == []


def test_doctor_reads_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_SHARE", str(tmp_path))
    assert doctor.setup_accelerator() is None
    (tmp_path / "accelerator.json").write_text('{"accelerator": "cpu", "why": "no NVIDIA GPU"}')
    assert doctor.setup_accelerator() == {"accelerator": "cpu", "why": "no NVIDIA GPU"}
    (tmp_path / "accelerator.json").write_text("[1]")
    assert doctor.setup_accelerator() is None


def test_doctor_names_llama_cpps_tools_and_how_to_get_them(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import stack

    monkeypatch.setenv("APPLIANCE_SHARE", str(tmp_path))
    missing: list[dict[str, str]] = []
    assert doctor._check_file("llama.cpp tools", stack.llama_tools_dir, missing) is None
    (problem,) = missing
    assert "llama-imatrix and llama-quantize are not installed" in problem["problem"]
    assert "set-up" in problem["fix"]
    bin_dir = tmp_path / "llama.cpp" / "bin"
    bin_dir.mkdir(parents=True)
    for name in stack.LLAMA_TOOLS:
        (bin_dir / name).write_text("#!/bin/sh\n")
    assert stack.llama_tools_missing() == list(stack.LLAMA_TOOLS)  # there, but not executable
    for name in stack.LLAMA_TOOLS:
        (bin_dir / name).chmod(0o755)
    assert doctor._check_file("llama.cpp tools", stack.llama_tools_dir, missing) == str(bin_dir)
    said: list[str] = []
    doctor.print_report(_report(llama_tools=None), said.append)
    assert any(line.startswith("imatrix     missing: GGUF exports quantize without") for line in said)


def _report(**fields: object) -> dict[str, object]:
    return {"python": "3.11", "profile": {"profile": "full"}, "versions": {},
            "cpu": {"model": "x", "cores": 2, "memory_gib": 1, "features": []}, "gpus": [],
            "runtimes": {"onnxruntime_providers": [], "llama_cpp_gpu_offload": False},
            "disk": {"workspace": "/w", "exists": True, "free_gib": 9, "total_gib": 9},
            "offline": {"guard_installed": True, "offline_env": True}, "default_model": "m",
            "converter": "c", "leftovers": [], "missing": [], **fields}
