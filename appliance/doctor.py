"""`appliance doctor`: what this box has, what is missing, and how to fix it.

Everything is read locally: package metadata, /proc, torch's CUDA probe, onnxruntime's providers.
It names the install's profile (`full` or `edge`: `appliance.profile`) and the offline kit it came
from, and checks what that profile needs: an edge install lacks torch and transformers on purpose
and is not told to install them.

It also lists the unfinished writes a killed process left in the workspace: hidden `.staging-*`
folders (an import killed halfway leaves the default model's 94 MB there) and `.trash-*` folders
of a replace whose cleanup died. A leftover is only ever one whose writer is dead: a writer holds
its artifact's lock (flock, dropped by the kernel when the process dies) for as long as it runs,
so a folder whose lock is free has no writer. `remove_leftovers` (`appliance doctor --clean`)
removes those, each while holding that same lock, and records each removal in the audit log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import offline, profile, stack
from appliance.errors import ApplianceError
from appliance.fsutil import FileLock
from appliance.versions import package_version, stack_versions
from appliance.workspace import KIND_DIRS, STAGING_PREFIX, Workspace

LEFTOVER_RE = re.compile(rf"^(?:{re.escape(STAGING_PREFIX)}(?P<name>.+)-\d+-[0-9a-f]{{8}}"
                         r"|\.trash-(?P<trashed>.+)-[0-9a-f]{8})$")
CLEAN_COMMAND = "appliance doctor --clean"

REQUIRED = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "accelerate",
            "optimum", "optimum-onnx", "onnxruntime", "onnxruntime-genai", "onnx-ir", "llama_cpp_python",
            "gguf", "safetensors", "textual", "huggingface-hub")
# A CUDA set-up installs the GPU build under another name: it satisfies the requirement.
GPU_BUILDS = {"onnxruntime": "onnxruntime-gpu", "onnxruntime-genai": "onnxruntime-genai-cuda"}
# What the edge profile (serve and chat) needs: the package's own dependencies (pyproject.toml)
EDGE_REQUIRED = ("llama_cpp_python", "gguf", "onnxruntime", "tokenizers", "numpy", "jinja2",
                 "aiohttp", "textual", "psutil", "argcomplete")
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
    from appliance import cpus

    dtype, why = cpus.cpu_compute_dtype()
    return {"model": model, "cores": os.cpu_count(), "memory_gib": mem and round(mem / 2**30, 1),
            "features": [f for f in CPU_FLAGS if f in flags], "train_dtype": dtype,
            "train_dtype_why": why}


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
    info["setup"] = setup_accelerator()
    return info


def setup_accelerator() -> dict[str, Any] | None:
    """What set-up chose (scripts/setup.sh writes accelerator.json: cpu or cuda, and why)."""
    try:
        data = json.loads((stack.share_dir() / "accelerator.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _runtime_problems(rt: dict[str, Any]) -> list[dict[str, str]]:
    """A CUDA set-up whose runtimes cannot reach the GPU (a driver gone, a CPU wheel over it)."""
    chose = (rt.get("setup") or {}).get("accelerator")
    if chose != "cuda":
        return []
    out = []
    if rt.get("llama_cpp_gpu_offload") is False:
        out.append({"what": "llama.cpp GPU offload", "problem": "set-up built for CUDA, but this "
                    "llama.cpp cannot offload (no GPU visible, or a CPU build installed over it)",
                    "fix": "check nvidia-smi; run the set-up again (APPLIANCE_ACCEL=cuda)"})
    if rt.get("onnxruntime_providers") is not None and \
            "CUDAExecutionProvider" not in rt["onnxruntime_providers"]:
        out.append({"what": "onnxruntime CUDA", "problem": "set-up chose CUDA, but onnxruntime has "
                    "no CUDA execution provider", "fix": "run the set-up again (APPLIANCE_ACCEL=cuda)"})
    return out


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


# -- unfinished writes ------------------------------------------------------------------------------
def _writer_alive(lock_path: Path) -> bool:
    """Whether a process holds the artifact's writer lock (never taken here, only tested)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # no writer of that name ever ran
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock, if it was granted
    return False


def _size_and_age(path: Path) -> tuple[int, float]:
    size, newest = 0, path.lstat().st_mtime
    for top, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                size += st.st_size
                newest = max(newest, st.st_mtime)
    return size, max(0.0, time.time() - newest)


def find_leftovers(ws: Workspace) -> list[dict[str, Any]]:
    """Unfinished writes whose writer is dead: path, kind, name, size_bytes, age_s. A `.trash-*`
    counts only when its artifact is in place (otherwise it may be the only copy, which the next
    writer of that name restores)."""
    found = []
    for kind, sub in KIND_DIRS.items():
        folder = ws.root / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = LEFTOVER_RE.match(path.name)
            if match is None or not path.is_dir() or path.is_symlink():
                continue
            name = match["name"] or match["trashed"]
            if match["trashed"] and not (folder / name).is_dir():
                continue
            if _writer_alive(ws._lock_path(kind, name)):
                continue
            size, age = _size_and_age(path)
            found.append({"path": str(path), "kind": kind, "name": name, "size_bytes": size,
                          "age_s": round(age)})
    return found


def remove_leftovers(ws: Workspace) -> list[Path]:
    """Remove the unfinished writes of dead writers (each under its artifact's lock, as a writer
    would), record each in the audit log, and return their paths."""
    removed = []
    for item in find_leftovers(ws):
        path = Path(item["path"])
        lock = FileLock(ws._lock_path(item["kind"], item["name"]))
        if not lock.try_acquire():
            continue  # a writer of that name started meanwhile: it cleans up itself
        try:
            if not path.is_dir():
                continue
            shutil.rmtree(path)
        finally:
            lock.release()
        removed.append(path)
        ws.audit("leftover-removed", path=str(path), kind=item["kind"], name=item["name"],
                 size_bytes=item["size_bytes"])
    return removed


def _human_size(n: int) -> str:
    return f"{n / 10**9:.1f} GB" if n >= 10**9 else f"{n / 10**6:.0f} MB" if n >= 10**6 \
        else f"{n / 10**3:.0f} kB"


def _human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def print_leftovers(leftovers: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    if not leftovers:
        say("leftovers   none")
        return
    total = sum(item["size_bytes"] for item in leftovers)
    say(f"leftovers   {len(leftovers)} unfinished write(s) of killed processes hold "
        f"{_human_size(total)}; remove them with `{CLEAN_COMMAND}`")
    for item in leftovers:
        say(f"  - {item['path']} ({item['kind']} {item['name']!r}, "
            f"{_human_size(item['size_bytes'])}, {_human_age(item['age_s'])} old)")


def required_packages(profile_name: str) -> tuple[str, ...]:
    return REQUIRED if profile_name == profile.FULL else EDGE_REQUIRED


def _installed(name: str, versions: dict[str, str | None]) -> bool:
    return any((versions[n] if n in versions else package_version(n)) is not None
               for n in (name, GPU_BUILDS.get(name)) if n)


def collect(ws: Workspace) -> dict[str, Any]:
    versions = stack_versions()
    install = profile.describe()
    edge = install["profile"] == profile.EDGE
    fix = stack.SETUP_HINT + (" (from a kit: the kit's ./install.sh)" if install["kit"] else "")
    missing = [{"what": name, "problem": "not installed", "fix": fix}
               for name in required_packages(install["profile"])
               if not _installed(name, versions)]
    default_model = _check_file("default model", lambda: stack.default_model_path(verify=True),
                                missing)
    # the converter makes GGUF exports of trained runs: the edge profile serves, it does not export
    converter = _check_file("GGUF converter", stack.converter_dir, [] if edge else missing)
    tools = _check_file("llama.cpp tools", stack.llama_tools_dir, [] if edge else missing)
    runtimes = runtime_info()
    missing += _runtime_problems(runtimes)
    disk = disk_info(ws)
    if disk["free_gib"] < 5:
        missing.append({"what": "disk space", "problem": f"only {disk['free_gib']} GiB free",
                        "fix": f"free space under {disk['workspace']} or set APPLIANCE_HOME"})
    return {
        "python": platform.python_version(),
        "profile": install,
        "versions": versions,
        "cpu": cpu_info(),
        "gpus": [] if edge else gpu_info(),  # torch's probe: the edge profile has no torch
        "runtimes": runtimes,
        "disk": disk,
        "offline": offline.status(),
        "default_model": default_model,
        "converter": converter,
        "llama_tools": tools,
        "leftovers": find_leftovers(ws),
        "missing": missing,
    }


def _profile_lines(install: dict[str, Any]) -> list[str]:
    """`profile     edge (serve and chat; training needs the full profile)` and the kit lines."""
    name = install.get("profile")
    if name == profile.FULL:
        what = "full (training, export, serve and chat)"
    elif install.get("forced") and not install.get("missing_for_full"):
        what = f"edge (forced by {profile.OVERRIDE_ENV}=edge; training is refused)"
    else:
        lacking = ", ".join(install.get("missing_for_full") or [])
        what = f"edge (serve and chat; training needs the full profile{': no ' + lacking if lacking else ''})"
    lines = [f"profile     {what}"]
    kit = install.get("kit")
    if kit:
        parts = [f"appliance {kit.get('appliance_version') or '?'}, {kit.get('profile') or '?'} profile"]
        parts += [f"built {kit['created']}"] * bool(kit.get("created"))
        parts += [f"for {kit['target']}"] * bool(kit.get("target"))
        parts += [f"installed {kit['installed']}"] * bool(kit.get("installed"))
        lines.append("kit         " + ", ".join(parts))
        if kit.get("profile") and kit.get("profile") != name:
            lines.append(f"            (the kit was the {kit['profile']} profile; this install now "
                         f"reads as {name})")
    else:
        lines.append("kit         none (not installed from an offline kit)")
    previous = install.get("previous_kit")
    if previous:
        was = f"appliance {previous.get('appliance_version') or '?'}"
        if previous.get("profile"):
            was += f", {previous['profile']} profile"
        if previous.get("installed"):
            was += f", installed {previous['installed']}"
        lines.append(f"previous    {was}")
    return lines


def print_report(report: dict[str, Any], say: Callable[[str], None]) -> None:
    say(f"python      {report['python']}")
    for line in _profile_lines(report.get("profile") or {}):
        say(line)
    say("packages    " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v))
    cpu = report["cpu"]
    say(f"cpu         {cpu['model']}, {cpu['cores']} cores, {cpu['memory_gib']} GiB RAM, "
        f"features: {' '.join(cpu['features']) or 'none of ' + ' '.join(CPU_FLAGS)}")
    if cpu.get("train_dtype_why"):
        say(f"cpu train   {cpu['train_dtype_why']}")
    if report["gpus"]:
        for g in report["gpus"]:
            say(f"gpu {g['index']}       {g['name']}, {g['memory_gib']} GiB ({g['free_gib']} free), "
                f"compute {g['compute_capability']}, bf16 {'yes' if g['bf16'] else 'no (fp16)'}")
    elif (report.get("profile") or {}).get("profile") == profile.EDGE:
        say("gpu         not probed (no torch on the edge profile; llama.cpp GPU offload below)")
    else:
        say("gpu         none found (training runs on CPU: small models only)")
    rt = report["runtimes"]
    say(f"runtimes    onnxruntime {rt['onnxruntime_providers']}, llama.cpp GPU offload "
        f"{rt['llama_cpp_gpu_offload']}")
    chose = rt.get("setup")
    say("set-up      " + (f"{chose.get('accelerator')} ({chose.get('why')})" if chose else
                          "no record (made before set-up or a kit install recorded its accelerator)"))
    d = report["disk"]
    say(f"workspace   {d['workspace']} ({'exists' if d['exists'] else 'not created yet'}), "
        f"{d['free_gib']} GiB free of {d['total_gib']}")
    off = report["offline"]
    say(f"offline     guard {'on' if off['guard_installed'] else 'OFF'}, HF offline variables "
        f"{'set' if off['offline_env'] else 'missing: ' + ', '.join(off['missing_env'])}")
    say(f"default     {report['default_model'] or 'missing'}")
    edge = (report.get("profile") or {}).get("profile") == profile.EDGE
    say(f"converter   {report['converter'] or ('not needed on the edge profile' if edge else 'missing')}")
    tools = report.get("llama_tools")
    say("imatrix     " + (f"{tools} (llama-imatrix, llama-quantize)" if tools else
                          "not needed on the edge profile" if edge else
                          "missing: GGUF exports quantize without an importance matrix"))
    print_leftovers(report.get("leftovers") or [], say)
    if report["missing"]:
        say("problems:")
        for m in report["missing"]:
            say(f"  - {m['what']}: {m['problem']} -> {m['fix']}")
    else:
        say("all good")
