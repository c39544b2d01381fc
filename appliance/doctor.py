"""`appliance doctor`: what this box has, what is missing, and how to fix it.

Everything is read locally: package metadata, /proc, torch's CUDA probe, onnxruntime's providers.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import offline, stack
from appliance.errors import ApplianceError
from appliance.versions import stack_versions
from appliance.workspace import Workspace

REQUIRED = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "accelerate",
            "optimum", "optimum-onnx", "onnxruntime", "onnx-ir", "llama_cpp_python", "gguf",
            "safetensors", "textual", "huggingface-hub")
CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni", "amx_tile")


def cpu_info() -> dict[str, Any]:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"model": model, "cores": os.cpu_count(), "memory_gib": mem and round(mem / 2**30, 1),
            "features": [f for f in CPU_FLAGS if f in flags]}


def gpu_info() -> list[dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": props.name, "memory_gib": round(total / 2**30, 1),
                     "free_gib": round(free / 2**30, 1),
                     "compute_capability": f"{props.major}.{props.minor}",
                     "bf16": props.major >= 8})
    return gpus


def runtime_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = None
    try:
        import llama_cpp

        info["llama_cpp_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except ImportError:
        info["llama_cpp_gpu_offload"] = None
    return info


def disk_info(ws: Workspace) -> dict[str, Any]:
    probe = ws.root
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"workspace": str(ws.root), "exists": ws.root.exists(),
            "free_gib": round(usage.free / 2**30, 1), "total_gib": round(usage.total / 2**30, 1)}


def _check_file(what: str, finder: Callable[[], Path], missing: list[dict[str, str]]) -> str | None:
    try:
        return str(finder())
    except ApplianceError as exc:
        missing.append({"what": what, "problem": exc.message, "fix": exc.hint or stack.SETUP_HINT})
        return None


def collect(ws: Workspace) -> dict[str, Any]:
    versions = stack_versions()
    missing = [{"what": name, "problem": "not installed", "fix": stack.SETUP_HINT}
               for name in REQUIRED if versions.get(name) is None]
    default_model = _check_file("default model", lambda: stack.default_model_path(verify=True),
                                missing)
    converter = _check_file("GGUF converter", stack.converter_dir, missing)
    disk = disk_info(ws)
    if disk["free_gib"] < 5:
        missing.append({"what": "disk space", "problem": f"only {disk['free_gib']} GiB free",
                        "fix": f"free space under {disk['workspace']} or set APPLIANCE_HOME"})
    return {
        "python": platform.python_version(),
        "versions": versions,
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "runtimes": runtime_info(),
        "disk": disk,
        "offline": offline.status(),
        "default_model": default_model,
        "converter": converter,
        "missing": missing,
    }


def print_report(report: dict[str, Any], say: Callable[[str], None]) -> None:
    say(f"python      {report['python']}")
    say("packages    " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    cpu = report["cpu"]
    say(f"cpu         {cpu['model']}, {cpu['cores']} cores, {cpu['memory_gib']} GiB RAM, "
        f"features: {' '.join(cpu['features']) or 'none of ' + ' '.join(CPU_FLAGS)}")
    if report["gpus"]:
        for g in report["gpus"]:
            say(f"gpu {g['index']}       {g['name']}, {g['memory_gib']} GiB ({g['free_gib']} free), "
                f"compute {g['compute_capability']}, bf16 {'yes' if g['bf16'] else 'no (fp16)'}")
    else:
        say("gpu         none found (training runs on CPU: small models only)")
    rt = report["runtimes"]
    say(f"runtimes    onnxruntime {rt['onnxruntime_providers']}, llama.cpp GPU offload "
        f"{rt['llama_cpp_gpu_offload']}")
    d = report["disk"]
    say(f"workspace   {d['workspace']} ({'exists' if d['exists'] else 'not created yet'}), "
        f"{d['free_gib']} GiB free of {d['total_gib']}")
    off = report["offline"]
    say(f"offline     guard {'on' if off['guard_installed'] else 'OFF'}, HF offline variables "
        f"{'set' if off['offline_env'] else 'missing: ' + ', '.join(off['missing_env'])}")
    say(f"default     {report['default_model'] or 'missing'}")
    say(f"converter   {report['converter'] or 'missing'}")
    if report["missing"]:
        say("problems:")
        for m in report["missing"]:
            say(f"  - {m['what']}: {m['problem']} -> {m['fix']}")
    else:
        say("all good")
