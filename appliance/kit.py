"""The offline kit: one folder an air-gapped box installs the appliance from, with no network and
no compiler, checked file by file before anything is installed.

A kit holds every wheel a profile needs (`full`: training box; `edge`: serve and chat only), the
portable llama-cpp-python wheel, llama.cpp's converter tree with its llama-imatrix and
llama-quantize (built at set-up against that wheel's libraries), the embedded default model, the
appliance itself as a wheel, and `kit.json`: the target (Python version, platform, accelerator),
the profile, the appliance version, and every file with its size and sha256. `verify` refuses a
kit for another Python or platform, a missing, changed or extra file, or a link, naming the file
and the check, so a damaged or altered kit never gets as far as pip.

The target's accelerator is `cpu` or `cuda`. A kit carries the llama-cpp-python wheel and the
llama.cpp tools of the set-up it was built from, so it is built from a set-up of its own accelerator
(`share/accelerator.json` says which): a cuda kit after `APPLIANCE_ACCEL=cuda make setup`. A cuda kit
adds onnxruntime-gpu (CUDA 13, with the nvidia-* runtime wheels), onnxruntime-genai-cuda and, for the
full profile, liger-kernel and a CUDA build of torch; kit.json's `contents.cuda` says what replaces
what, so `accelerate` (run by both installers after pip) needs no knowledge of its own. `verify`
refuses a cuda kit on a box with no NVIDIA GPU or a driver too old for its CUDA, before hashing.

This module is the standard library only: it runs before anything is installed
(`python3 appliance/kit.py verify DIR`, and a copy travels in each kit as `verify.py`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "kit.json"
PROFILES = ("full", "edge")
ACCELERATORS = ("cpu", "cuda")
CHUNK = 1 << 20
LLAMA_TOOLS = ("llama-imatrix", "llama-quantize")  # share/llama.cpp/bin: export gguf --imatrix
SETUP_RECORD = "accelerator.json"  # what scripts/setup.sh chose: accelerator, why, cuda_architectures, ...
# The CUDA kit, as scripts/setup.sh's CUDA branch: the GPU build of each runtime replaces the CPU one
# (one module, two packages: never both installed), and onnxruntime-gpu 1.31's CUDA is 13.
CUDA_MAJOR = 13
GPU_BUILDS = {"onnxruntime": "onnxruntime-gpu", "onnxruntime-genai": "onnxruntime-genai-cuda"}
ORT_GPU = "onnxruntime-gpu[cuda,cudnn]"  # with the nvidia-* runtime wheels (CUDA, cuDNN)


class KitError(Exception):
    """A kit that must not be installed: `path` is the file (or the kit), `check` what failed."""

    def __init__(self, path: str, check: str, message: str) -> None:
        super().__init__(f"{path}: {check}: {message}")
        self.path, self.check, self.message = path, check, message


@dataclass(frozen=True)
class Target:
    """What a kit's wheels were chosen for: they install only on the same Python and platform."""

    python: str
    platform: str
    accelerator: str = "cpu"

    @classmethod
    def here(cls, accelerator: str = "cpu") -> Target:
        return cls(f"{sys.version_info.major}.{sys.version_info.minor}", this_platform(), accelerator)


def this_platform() -> str:
    """The platform wheels are built for, as in their tags (`linux-x86_64` -> `linux_x86_64`)."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def scan(kit_dir: Path) -> dict[str, dict[str, Any]]:
    """Every file under the kit but its manifest: relative path -> size and sha256. A link or
    anything but a regular file or folder is refused (a kit is copied between machines; a link
    would point somewhere else there)."""
    files: dict[str, dict[str, Any]] = {}
    for root, dirs, names in os.walk(kit_dir):
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(kit_dir).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise KitError(rel, "file type", "is a link; a kit holds regular files only")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise KitError(rel, "file type", "is not a regular file")
            if rel != MANIFEST:
                files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return dict(sorted(files.items()))


def write_manifest(kit_dir: Path, *, profile: str, target: Target, version: str,
                   contents: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record what the kit holds (call it last, once every file is in place)."""
    if profile not in PROFILES:
        raise KitError(str(kit_dir), "profile", f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    manifest = {
        "format": FORMAT, "appliance_version": version, "profile": profile, "target": asdict(target),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "contents": contents or {}, "files": scan(kit_dir),
    }
    tmp = kit_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(kit_dir / MANIFEST)
    return manifest


def read_manifest(kit_dir: Path) -> dict[str, Any]:
    path = kit_dir / MANIFEST
    if not kit_dir.is_dir():
        raise KitError(str(kit_dir), "kit folder", "does not exist or is not a folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KitError(str(path), "manifest", "is missing: this folder is not a kit") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KitError(str(path), "manifest", f"is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) \
            or not isinstance(data.get("target"), dict):
        raise KitError(str(path), "manifest", "is not a kit manifest (no files or target)")
    if data.get("format") != FORMAT:
        raise KitError(str(path), "format", f"kit format {data.get('format')!r}; this set-up reads {FORMAT}")
    return data


@dataclass(frozen=True)
class Gpu:
    """What `nvidia-smi` says of this box: how many GPUs, and the CUDA version its driver supports."""

    count: int
    cuda: tuple[int, int] | None = None
    smi: str | None = None  # the nvidia-smi found on PATH, None where there is none
    hung: bool = False      # it did not answer within SMI_TIMEOUT (a driver in trouble)


SMI_TIMEOUT = 20.0


def _output(cmd: list[str]) -> str | None:
    """The command's output; None when it does not finish in SMI_TIMEOUT s. A process stuck in the
    kernel (a hung driver) may not even die when killed: it is left, never waited for."""
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return ""
    try:
        out, _ = proc.communicate(timeout=SMI_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    return out


def probe_gpu() -> Gpu:
    """`nvidia-smi -L` (a `GPU n: ...` line each) and plain `nvidia-smi` (its `CUDA Version: X.Y`
    header), the nvidia-smi on PATH, as scripts/setup.sh counts GPUs."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Gpu(0)
    listing = _output([smi, "-L"])
    if listing is None:
        return Gpu(0, smi=smi, hung=True)
    count = sum(line.startswith("GPU ") for line in listing.splitlines())
    header = _output([smi]) if count else ""
    if header is None:
        return Gpu(count, smi=smi, hung=True)
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", header)
    return Gpu(count, (int(found[1]), int(found[2])) if found else None, smi)


def _cuda_section(manifest: dict[str, Any]) -> dict[str, Any]:
    """kit.json's `contents.cuda` (what a cuda kit swaps), or {} (a cpu kit)."""
    contents = manifest.get("contents")
    cuda = contents.get("cuda") if isinstance(contents, dict) else None
    return cuda if isinstance(cuda, dict) else {}


def _cuda_runtimes(manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What a cuda kit installs after the profile: with dependencies, and without."""
    cuda = _cuda_section(manifest)
    install, no_deps = cuda.get("install"), cuda.get("install_no_deps")
    if not isinstance(install, list) or not install or not isinstance(no_deps, list):
        raise KitError(MANIFEST, "accelerator", "the kit is for CUDA but names no GPU runtimes to "
                       "install (an older kit: only its target said cuda); build it again")
    return [str(r) for r in install], [str(r) for r in no_deps]


def _check_gpu(manifest: dict[str, Any], gpu: Gpu) -> None:
    """A cuda kit needs an NVIDIA GPU and a driver for the kit's CUDA (its runtimes fail without)."""
    _cuda_runtimes(manifest)
    need = _cuda_section(manifest).get("cuda_major")
    need = need if isinstance(need, int) else CUDA_MAJOR
    cpu_kit = "install from a cpu kit instead (`kit build --accelerator cpu` on a connected machine)"
    if gpu.hung:
        raise KitError(MANIFEST, "accelerator", f"the kit is for CUDA, and `{gpu.smi}` did not answer in "
                       f"{SMI_TIMEOUT:.0f} s: check the NVIDIA driver (`nvidia-smi` must answer), then "
                       "install again")
    if gpu.count == 0:
        where = "there is no nvidia-smi" if gpu.smi is None else f"`{gpu.smi} -L` lists no GPU"
        raise KitError(MANIFEST, "accelerator", f"the kit is for CUDA, but this box has no NVIDIA GPU "
                       f"({where}): {cpu_kit}")
    if gpu.cuda is None or gpu.cuda[0] < need:
        has = "no CUDA version" if gpu.cuda is None else f"CUDA {gpu.cuda[0]}.{gpu.cuda[1]}"
        raise KitError(MANIFEST, "accelerator", f"the kit needs an NVIDIA driver for CUDA {need}, "
                       f"this one supports {has} (`nvidia-smi`): update the driver to one that "
                       f"supports CUDA {need}, or {cpu_kit}")


def _check_target(manifest: dict[str, Any], here: Target, profile: str | None) -> None:
    target = manifest["target"]
    if target.get("accelerator", "cpu") not in ACCELERATORS:
        raise KitError(MANIFEST, "accelerator", f"the kit is for {target.get('accelerator')!r}; this "
                       f"installer knows {', '.join(ACCELERATORS)}")
    if target.get("python") != here.python:
        raise KitError(MANIFEST, "python", f"the kit is for Python {target.get('python')}, this "
                       f"Python is {here.python}: build a kit for it (`appliance kit build` with "
                       f"that Python) or install with Python {target.get('python')}")
    if target.get("platform") != here.platform:
        raise KitError(MANIFEST, "platform", f"the kit is for {target.get('platform')}, this "
                       f"machine is {here.platform}")
    if profile is not None and manifest.get("profile") != profile:
        raise KitError(MANIFEST, "profile", f"the kit holds the {manifest.get('profile')!r} "
                       f"profile, {profile!r} was asked for")


def verify(kit_dir: Path, *, here: Target | None = None, profile: str | None = None,
           gpu: Callable[[], Gpu] | None = probe_gpu) -> dict[str, Any]:
    """The kit's manifest, once every check passed; else a KitError naming the file and check.

    Order: the manifest, the target (a kit for another Python is refused before hashing 2 GB; a
    cuda kit on a box with no NVIDIA GPU or too old a driver too: `gpu` asks nvidia-smi), then every
    file: missing, changed size, changed content (sha256), and files the manifest does not list."""
    kit_dir = Path(kit_dir)
    manifest = read_manifest(kit_dir)
    _check_target(manifest, here or Target.here(manifest["target"].get("accelerator", "cpu")), profile)
    if manifest["target"].get("accelerator") == "cuda" and gpu is not None:  # None: a copy station
        _check_gpu(manifest, gpu())
    listed: dict[str, dict[str, Any]] = manifest["files"]
    for rel, entry in listed.items():
        path = kit_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise KitError(rel, "path", "points outside the kit")
        if not path.is_file() or path.is_symlink():
            raise KitError(rel, "missing", "is listed in kit.json but not in the kit")
        if path.stat().st_size != entry.get("size"):
            raise KitError(rel, "size", f"is {path.stat().st_size} bytes, kit.json says {entry.get('size')}")
        if sha256_file(path) != entry.get("sha256"):
            raise KitError(rel, "sha256", "content differs from kit.json (altered or damaged)")
    extra = sorted(set(scan(kit_dir)) - set(listed))
    if extra:
        raise KitError(extra[0], "extra file", f"is not listed in kit.json ({len(extra)} such file(s))")
    return manifest


def describe(manifest: dict[str, Any]) -> str:
    size = sum(int(e["size"]) for e in manifest["files"].values())
    t = manifest["target"]
    return (f"appliance {manifest.get('appliance_version')} kit, profile {manifest.get('profile')}, "
            f"Python {t.get('python')} {t.get('platform')} {t.get('accelerator')}: "
            f"{len(manifest['files'])} files, {size / 2**20:.0f} MiB")


# -- installing from a kit (the kit's install.sh and `scripts/setup.sh --kit` call these) --------
INSTALL_SH = """#!/bin/sh
# Install the appliance from this kit, with no network and no compiler:  ./install.sh [VENV]
# Every file is checked against kit.json first; nothing is installed from a kit that fails.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-${VENV:-$HOME/appliance}}
PY=${PYTHON:-python3}
"$PY" -I "$KIT/verify.py" verify "$KIT" || exit 2
PROFILE=$("$PY" -I -c 'import json,sys; print(json.load(open(sys.argv[1]))["profile"])' "$KIT/kit.json")
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
OLD=$("$VENV/bin/python" -I -c 'import importlib.metadata as m; print(m.version("appliance"))' \\
  2>/dev/null || true)
PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip install -q --no-index --no-cache-dir \\
  --disable-pip-version-check --find-links "$KIT/wheels" --upgrade "appliance[$PROFILE]"
"$VENV/bin/python" -I "$KIT/verify.py" accelerate "$KIT" "$VENV/bin/python"
mkdir -p "$VENV/share/appliance"
cp -R "$KIT/share/." "$VENV/share/appliance/"
chmod +x "$VENV"/share/appliance/llama.cpp/bin/llama-* 2>/dev/null || true
"$VENV/bin/python" -I "$KIT/verify.py" record "$KIT" "$VENV/share/appliance" ${OLD:+--previous "$OLD"}
echo "installed: $VENV/bin/appliance ($PROFILE profile)"
"""
_INSTALLED = """import importlib.metadata as m, sys
for name in sys.argv[1:]:
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        pass
"""


def installed_versions(python: str, names: list[str]) -> dict[str, str] | None:
    """The versions of those of `names` installed in `python`'s environment; None if it cannot tell."""
    try:
        out = subprocess.run([python, "-I", "-c", _INSTALLED, *names], capture_output=True, text=True,
                             check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return {name: found[name] for name in names if name in found}


def _kit_wheels(manifest: dict[str, Any]) -> dict[str, str]:
    """The kit's wheels by normalized name -> file name (`onnxruntime_genai-0.15.2-cp311-...whl`
    under `onnxruntime-genai`): the last one in sort order where a name has several."""
    found: dict[str, str] = {}
    for rel in sorted(manifest["files"]):
        name = Path(rel).name
        if rel.startswith("wheels/") and name.endswith(".whl") and len(name.split("-")) >= 5:
            found[_normalize(name.split("-")[0])] = name  # name-version-python-abi-platform.whl
    return found


def _version_of(wheel: str) -> str:
    return wheel.split("-")[1]


def _swap(manifest: dict[str, Any]) -> dict[str, str]:
    """CPU package -> its GPU build, as kit.json records it (GPU_BUILDS for a kit without)."""
    recorded = _cuda_section(manifest).get("swap")
    return recorded if isinstance(recorded, dict) else GPU_BUILDS


def accelerate_commands(kit_dir: Path, manifest: dict[str, Any], python: str,
                        installed: dict[str, str] | None) -> list[list[str]]:
    """The pip commands that give the installed runtimes the kit's accelerator, once `appliance[PROFILE]`
    is installed from the kit (which installs the CPU onnxruntime, also over a GPU build).
    `installed`: the environment's versions by package (`installed_versions`; None: unknown, every
    build is taken as present, since uninstalling one that is not there only makes pip warn).

    A cuda kit: uninstall both builds of onnxruntime and onnxruntime-genai (one module, two packages:
    removing one build deletes the other's files too), then install what kit.json's `contents.cuda`
    names. A cpu kit over a CUDA install: the same the other way round. Else nothing."""
    pip = [python, "-m", "pip"]
    offline = ["install", "-q", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
               "--find-links", str(Path(kit_dir) / "wheels")]
    swap = _swap(manifest)
    both = [name for pair in swap.items() for name in pair]
    present = set(both) if installed is None else set(both) & set(installed)
    if manifest["target"].get("accelerator") == "cuda":
        install, no_deps = _cuda_runtimes(manifest)
    elif present & set(swap.values()):
        wheels = _kit_wheels(manifest)
        install, no_deps = [], [f"{name}=={_version_of(wheels[name])}" for name in swap if name in wheels]
    else:
        return []
    commands = [[*pip, "uninstall", "-q", "-y", *(n for n in both if n in present)]] if present else []
    commands += [[*pip, *offline, *install]] if install else []
    commands += [[*pip, *offline, "--no-deps", *no_deps]] if no_deps else []
    return commands


def reinstall_commands(kit_dir: Path, manifest: dict[str, Any], python: str,
                       installed: dict[str, str] | None) -> list[list[str]]:
    """The kit's own builds put in place where `pip install --upgrade` keeps another build of the
    same version: llama-cpp-python (the CPU and the CUDA wheel are both 0.3.36; the kit's llama.cpp
    tools link its libraries), always; torch when the installed one is another build (2.13.0+cpu
    satisfies the profile as well as the CUDA 2.13.0 does), or when that cannot be told."""
    wheels = _kit_wheels(manifest)
    again = [wheels[name] for name in ("llama-cpp-python", "torch") if name in wheels]
    if "torch" in wheels and installed is not None and installed.get("torch") == _version_of(wheels["torch"]):
        again.remove(wheels["torch"])
    return [[python, "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir",
             "--disable-pip-version-check", "--force-reinstall", "--no-deps",
             *(str(Path(kit_dir) / "wheels" / name) for name in again)]] if again else []


def accelerate(kit_dir: Path, python: str, say: Callable[[str], None] = print,
               installed: dict[str, str] | None = None) -> list[list[str]]:
    """Run `accelerate_commands`, then `reinstall_commands`, with pip's configuration off (no index,
    the kit's wheels only). `installed`: as they take it; read from `python`'s environment when not
    given."""
    manifest = read_manifest(Path(kit_dir))
    if installed is None:
        installed = installed_versions(python, [*(n for pair in _swap(manifest).items() for n in pair),
                                                "torch"])
    commands = accelerate_commands(Path(kit_dir), manifest, python, installed)
    commands += reinstall_commands(Path(kit_dir), manifest, python, installed)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    for cmd in commands:
        _run(cmd, say, env=env)
    return commands


def _setup_record_of(manifest: dict[str, Any]) -> dict[str, str]:
    """What `share/accelerator.json` says after an install from this kit (the keys scripts/setup.sh
    writes, which `appliance doctor` shows and checks)."""
    accelerator = str(manifest["target"].get("accelerator") or "cpu")
    return {"accelerator": accelerator,
            "why": f"installed from the {accelerator} kit built {manifest.get('created')}",
            "cuda_architectures": str(_cuda_section(manifest).get("architectures") or ""),
            "llama_cpp_wheel": _kit_wheels(manifest).get("llama-cpp-python", "")}


def _write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    tmp.replace(path)


def record(kit_dir: Path, share: Path, previous: str | None = None) -> dict[str, Any]:
    """After an install from `kit_dir`: its manifest (less the file list) as `share/kit.json`, one
    line appended to `share/kit-history.json` (what `appliance doctor` shows), and the kit's
    accelerator as `share/accelerator.json`, as a set-up from source writes it."""
    manifest = read_manifest(Path(kit_dir))
    entry = {k: manifest.get(k) for k in ("appliance_version", "profile", "target", "created")}
    entry["installed"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    entry["previous_version"] = previous
    share.mkdir(parents=True, exist_ok=True)
    history_path = share / "kit-history.json"
    try:
        history = json.loads(history_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        history = []
    history = [*history, entry] if isinstance(history, list) else [entry]
    _write_json(share / "kit.json", entry)
    _write_json(history_path, history)
    _write_json(share / SETUP_RECORD, _setup_record_of(manifest), indent=None)
    return entry


# -- building a kit (on a connected machine, after `make setup`) ---------------------------------
def _run(cmd: list[str], say: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(constraints: Path, names: list[str]) -> dict[str, str]:
    """`name==version` of each of `names` in the constraints file (as scripts/setup.sh reads them)."""
    pins = {}
    for line in constraints.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[_normalize(name)] = version.strip()
    for name in names:
        if name not in pins:
            raise KitError(str(constraints), "constraints", f"pins no version of {name}")
    return pins


def _setup_record(share: Path) -> dict[str, Any]:
    try:
        data = json.loads((share / SETUP_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _llama_source(share: Path, cache: Path, accelerator: str) -> tuple[Path, dict[str, Any]]:
    """Where set-up cached the llama-cpp-python wheel the kit carries (pip's --find-links), and
    set-up's record. The kit's llama.cpp tools were built against that wheel, so the set-up must be
    of the kit's accelerator: a cuda kit from a CUDA set-up; a cpu kit from a CPU one (a CUDA
    set-up's tools need the CUDA wheel's libraries, and its cache may hold no CPU wheel at all)."""
    path, setup = share / SETUP_RECORD, _setup_record(share)
    chose = setup.get("accelerator") or "cpu"  # a set-up older than its record was a CPU one
    if accelerator == "cuda" and chose != "cuda":
        said = f"says {chose!r}" if setup else "is missing"
        raise KitError(str(path), "accelerator", f"{said}: a cuda kit carries set-up's CUDA build of "
                       "llama-cpp-python and llama.cpp's tools; run `APPLIANCE_ACCEL=cuda make setup` on "
                       "a connected CUDA box and build the kit there")
    if accelerator == "cpu" and chose == "cuda":
        raise KitError(str(path), "accelerator", "says 'cuda': this set-up's llama-cpp-python wheel and "
                       "llama.cpp tools are CUDA builds, which need an NVIDIA driver; build a cuda kit "
                       "here (--accelerator cuda), or the cpu kit from a CPU set-up "
                       "(`VENV=.venv-cpu APPLIANCE_ACCEL=cpu make setup`)")
    if accelerator == "cpu":
        return cache / "wheels", setup
    archs, name = setup.get("cuda_architectures"), setup.get("llama_cpp_wheel")
    if not isinstance(archs, str) or not archs or not isinstance(name, str) or not name:
        raise KitError(str(path), "accelerator", "names no cuda_architectures or llama_cpp_wheel: "
                       "run `APPLIANCE_ACCEL=cuda make setup` again")
    folder = cache / f"wheels-cuda-{archs.replace(';', '-')}"
    if not (folder / name).is_file():
        raise KitError(str(folder / name), "set-up", "set-up's CUDA build of llama-cpp-python is not "
                       "in the cache: run `APPLIANCE_ACCEL=cuda make setup` again (it rebuilds it)")
    return folder, setup


def _check_llama_wheel(wheels: Path, folder: Path, name: str, required: bool) -> None:
    """The kit's llama-cpp-python wheel is set-up's build, byte for byte (the CPU and the CUDA
    builds have one file name: only the content tells them apart)."""
    cached = folder / name
    if not required and not cached.is_file():
        return
    found = sorted(p.name for p in wheels.glob("llama_cpp_python-*.whl"))
    if found != [name]:
        raise KitError(f"wheels/{found[0] if found else name}", "accelerator",
                       f"the kit's llama-cpp-python wheels are {found or 'none'}, set-up's is {name}")
    if sha256_file(wheels / name) != sha256_file(cached):
        raise KitError(f"wheels/{name}", "accelerator", f"differs from set-up's build {cached} (sha256): "
                       "pip took llama-cpp-python from elsewhere (a --find-links or PIP_FIND_LINKS "
                       "folder); build the kit with that unset")


def _wheel_metadata(wheel: Path) -> tuple[str, list[str]]:
    """A wheel's Version and Requires-Dist (its .dist-info/METADATA)."""
    from email.parser import HeaderParser

    try:
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
            meta = HeaderParser().parsestr(z.read(member).decode("utf-8", "replace"))
    except (OSError, zipfile.BadZipFile, StopIteration):
        raise KitError(f"wheels/{wheel.name}", "wheel", "is not a wheel (no .dist-info/METADATA)") from None
    return str(meta.get("Version") or ""), [str(r) for r in meta.get_all("Requires-Dist") or []]


def _check_torch_cuda(wheels: Path) -> None:
    """A cuda kit of the full profile trains on the GPU: its torch must be a CUDA build."""
    found = sorted(wheels.glob("torch-*.whl"))
    if not found:
        raise KitError("wheels/torch-*.whl", "missing", "the full profile's torch wheel was not downloaded")
    version, requires = _wheel_metadata(found[-1])
    if "+cpu" in version or not any(_normalize(r).startswith("nvidia-") for r in requires):
        raise KitError(f"wheels/{found[-1].name}", "accelerator", "is a CPU build of torch; on this "
                       f"machine pip resolves torch to a CPU wheel (version {version}, needing no nvidia-* "
                       "package): a pip configuration or PIP_* variable (index-url, find-links: `pip config "
                       "list`) points at CPU wheels. Build the cuda kit where pip takes torch from PyPI "
                       "(its Linux wheels are CUDA builds), or build the edge profile")


def _cuda_runtimes_of(constraints: Path, profile: str) -> dict[str, Any]:
    """The GPU runtimes scripts/setup.sh's CUDA branch installs, at its pins; what replaces what."""
    extra = ["liger-kernel"] if profile == "full" else []
    pins = _pins(constraints, [*GPU_BUILDS, *extra])
    return {"cuda_major": CUDA_MAJOR, "swap": dict(GPU_BUILDS), "extra": extra,
            "install": [f"{ORT_GPU}=={pins['onnxruntime']}"],
            "install_no_deps": [f"{GPU_BUILDS['onnxruntime-genai']}=={pins['onnxruntime-genai']}",
                                *(f"{name}=={pins[name]}" for name in extra)]}


def _check_set_up(share: Path, profile: str) -> None:
    # the full profile exports GGUF with an importance matrix; the edge one serves (they travel anyway)
    tools = [share / "llama.cpp" / "bin" / name for name in LLAMA_TOOLS] if profile == "full" else []
    for need, what in ((share / "llama.cpp" / "convert_hf_to_gguf.py", "the GGUF converter"),
                       (share / "models", "the embedded default model"),
                       *((tool, f"llama.cpp's {tool.name}") for tool in tools)):
        if not need.exists():
            raise KitError(str(need), "set-up", f"{what} is missing: run `make setup` first")


def _fetch_wheels(wheels: Path, *, python: str, checkout: Path, share: Path, llama_links: Path,
                  profile: str, cuda: dict[str, Any] | None, say: Callable[[str], None]) -> None:
    """The appliance's and gguf-py's wheels, and every wheel of the profile (and of a cuda kit's GPU
    runtimes), with pip; a source archive among them is refused."""
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    constraints = checkout / "requirements" / "constraints.txt"
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(checkout)], say)
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(share / "llama.cpp" / "gguf-py")], say)
    get = [*pip, "download", "-q", "--prefer-binary", "-d", str(wheels), "--find-links", str(wheels),
           "-c", str(constraints)]
    # onnxruntime-gpu in the profile's resolve: its nvidia-* wheels are then the versions torch pins
    # (resolved apart, pip takes the newest: a second cuDNN, CUDA runtime, ... the install never uses)
    gpu = cuda["install"] if cuda else []
    _run([*get, "--find-links", str(llama_links), f"appliance[{profile}]", *gpu], say)
    if cuda:
        _run([*get, "--no-deps", *cuda["install_no_deps"]], say)
    not_wheels = sorted(p.name for p in wheels.iterdir() if p.suffix != ".whl")
    if not_wheels:
        raise KitError(f"wheels/{not_wheels[0]}", "wheel", "is a source archive: the air-gapped box "
                       "has no compiler; pin a version with a wheel for this platform")


def build(kit_dir: Path, *, profile: str, checkout: Path, share: Path, cache: Path,
          accelerator: str = "cpu", python: str = sys.executable,
          say: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill `kit_dir` (new or empty) with what `profile` needs on this Python and platform, then
    write its manifest. Uses pip and the network: run it on a connected machine, after a set-up of
    the kit's accelerator (a cuda kit: `APPLIANCE_ACCEL=cuda make setup` on a CUDA box)."""
    if profile not in PROFILES:
        raise KitError(profile, "profile", f"unknown profile; known: {', '.join(PROFILES)}")
    if accelerator not in ACCELERATORS:
        raise KitError(accelerator, "accelerator", f"unknown; known: {', '.join(ACCELERATORS)}")
    kit_dir = Path(kit_dir)
    if kit_dir.exists() and any(kit_dir.iterdir()):
        raise KitError(str(kit_dir), "kit folder", "is not empty: give a new or empty folder")
    _check_set_up(share, profile)
    llama_links, setup = _llama_source(share, cache, accelerator)
    constraints = checkout / "requirements" / "constraints.txt"
    cuda = _cuda_runtimes_of(constraints, profile) if accelerator == "cuda" else None
    wheels = kit_dir / "wheels"
    _fetch_wheels(wheels, python=python, checkout=checkout, share=share, llama_links=llama_links,
                  profile=profile, cuda=cuda, say=say)
    if isinstance(setup.get("llama_cpp_wheel"), str) and setup["llama_cpp_wheel"]:
        _check_llama_wheel(wheels, llama_links, setup["llama_cpp_wheel"], required=cuda is not None)
    if cuda is not None and profile == "full":
        _check_torch_cuda(wheels)
    shutil.copytree(share / "llama.cpp", kit_dir / "share" / "llama.cpp",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(share / "models", kit_dir / "share" / "models")
    shutil.copy2(Path(__file__), kit_dir / "verify.py")
    (kit_dir / "install.sh").write_text(INSTALL_SH, encoding="utf-8")
    (kit_dir / "install.sh").chmod(0o755)
    version = _wheel_version(wheels)
    sizes = {"wheels": sum(p.stat().st_size for p in wheels.iterdir()),
             "share": sum(p.stat().st_size for p in (kit_dir / "share").rglob("*") if p.is_file())}
    contents: dict[str, Any] = {"wheels": sorted(p.name for p in wheels.iterdir()), "bytes": sizes,
                                "llama_tools": [f"share/llama.cpp/bin/{n}" for n in LLAMA_TOOLS]}
    if cuda is not None:
        contents["cuda"] = {"architectures": setup["cuda_architectures"],
                            "llama_cpp_wheel": setup["llama_cpp_wheel"], **cuda}
    return write_manifest(kit_dir, profile=profile, target=Target.here(accelerator), version=version,
                          contents=contents)


def _wheel_version(wheels: Path) -> str:
    found = sorted(wheels.glob("appliance-*.whl"))
    if not found:
        raise KitError("wheels/appliance-*.whl", "missing", "the appliance's own wheel was not built")
    return found[-1].name.split("-")[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kit", description="check an appliance offline kit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every file of a kit against its kit.json")
    p.add_argument("dir", type=Path)
    p.add_argument("--profile", choices=PROFILES)
    p.add_argument("--no-gpu-check", action="store_true",
                   help="check a cuda kit's files on a box without its GPU (copying it, not installing)")
    b = sub.add_parser("build", help="build a kit (connected machine, after `make setup`)")
    b.add_argument("dir", type=Path)
    b.add_argument("--profile", choices=PROFILES, default="full")
    b.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    b.add_argument("--share", type=Path, default=Path(sys.prefix) / "share" / "appliance",
                   help="what `make setup` installed (default: this environment's)")
    b.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("APPLIANCE_CACHE") or Path.home() / ".cache" / "appliance"))
    a = sub.add_parser("accelerate", help="give the installed runtimes the kit's accelerator "
                       "(the installer calls it after pip)")
    a.add_argument("dir", type=Path)
    a.add_argument("python", help="the environment's Python")
    r = sub.add_parser("record", help="note an install from a kit (the installer calls it)")
    r.add_argument("dir", type=Path)
    r.add_argument("share", type=Path)
    r.add_argument("--previous")
    args = parser.parse_args(argv)
    if args.command == "accelerate":
        try:
            done = accelerate(args.dir, args.python)
        except (KitError, OSError, subprocess.CalledProcessError) as exc:
            print(f"kit runtimes not installed: {exc}\nthe environment may be left half swapped (no "
                  "onnxruntime): run the installer again; it checks and swaps again from the kit",
                  file=sys.stderr)
            return 2
        accelerator = read_manifest(args.dir)["target"].get("accelerator")
        print(f"runtimes: {accelerator}" + ("" if done else " (nothing to swap)"))
        return 0
    if args.command == "record":
        entry = record(args.dir, args.share, args.previous)
        print(f"recorded: appliance {entry['appliance_version']} ({entry['profile']} profile)"
              + (f", was {args.previous}" if args.previous else ""))
        return 0
    if args.command == "build":
        try:
            manifest = build(args.dir, profile=args.profile, accelerator=args.accelerator,
                             checkout=Path(__file__).resolve().parents[1], share=args.share,
                             cache=args.cache)
        except (KitError, subprocess.CalledProcessError) as exc:
            print(f"kit not built: {exc}", file=sys.stderr)
            return 2
        print(f"kit built in {args.dir}: {describe(manifest)}")
        return 0
    try:
        manifest = verify(args.dir, profile=args.profile, gpu=None if args.no_gpu_check else probe_gpu)
    except KitError as exc:
        print(f"kit refused: {exc}\nnothing was installed", file=sys.stderr)
        return 2
    print(f"kit verified: {describe(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
