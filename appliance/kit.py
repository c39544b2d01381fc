"""The offline kit: one folder an air-gapped box installs the appliance from, with no network and
no compiler, checked file by file before anything is installed.

A kit holds every wheel a profile needs (`full`: training box; `edge`: serve and chat only), the
portable llama-cpp-python wheel, llama.cpp's converter tree with its llama-imatrix and
llama-quantize (built at set-up against that wheel's libraries), the embedded default model, the
appliance itself as a wheel, and `kit.json`: the target (Python version, platform, accelerator),
the profile, the appliance version, and every file with its size and sha256. `verify` refuses a
kit for another Python or platform, a missing, changed or extra file, or a link, naming the file
and the check, so a damaged or altered kit never gets as far as pip.

This module is the standard library only: it runs before anything is installed
(`python3 appliance/kit.py verify DIR`, and a copy travels in each kit as `verify.py`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
MANIFEST = "kit.json"
PROFILES = ("full", "edge")
ACCELERATORS = ("cpu", "cuda")
CHUNK = 1 << 20
LLAMA_TOOLS = ("llama-imatrix", "llama-quantize")  # share/llama.cpp/bin: export gguf --imatrix


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


def _check_target(manifest: dict[str, Any], here: Target, profile: str | None) -> None:
    target = manifest["target"]
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


def verify(kit_dir: Path, *, here: Target | None = None, profile: str | None = None) -> dict[str, Any]:
    """The kit's manifest, once every check passed; else a KitError naming the file and check.

    Order: the manifest, the target (a kit for another Python is refused before hashing 2 GB),
    then every file: missing, changed size, changed content (sha256), and files the manifest does
    not list."""
    kit_dir = Path(kit_dir)
    manifest = read_manifest(kit_dir)
    _check_target(manifest, here or Target.here(manifest["target"].get("accelerator", "cpu")), profile)
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


# -- building a kit (on a connected machine, after `make setup`) ---------------------------------
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
mkdir -p "$VENV/share/appliance"
cp -R "$KIT/share/." "$VENV/share/appliance/"
chmod +x "$VENV"/share/appliance/llama.cpp/bin/llama-* 2>/dev/null || true
"$VENV/bin/python" -I "$KIT/verify.py" record "$KIT" "$VENV/share/appliance" ${OLD:+--previous "$OLD"}
echo "installed: $VENV/bin/appliance ($PROFILE profile)"
"""


def record(kit_dir: Path, share: Path, previous: str | None = None) -> dict[str, Any]:
    """After an install from `kit_dir`: its manifest (less the file list) as `share/kit.json`, and
    one line appended to `share/kit-history.json` (what `appliance doctor` shows)."""
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
    for path, data in ((share / "kit.json", entry), (history_path, history)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    return entry


def _run(cmd: list[str], say: Any) -> None:
    say("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def build(kit_dir: Path, *, profile: str, checkout: Path, share: Path, cache: Path,
          accelerator: str = "cpu", python: str = sys.executable, say: Any = print) -> dict[str, Any]:
    """Fill `kit_dir` (new or empty) with what `profile` needs on this Python and platform, then
    write its manifest. Uses pip and the network: run it on a connected machine."""
    if profile not in PROFILES:
        raise KitError(profile, "profile", f"unknown profile; known: {', '.join(PROFILES)}")
    if accelerator not in ACCELERATORS:
        raise KitError(accelerator, "accelerator", f"unknown; known: {', '.join(ACCELERATORS)}")
    kit_dir = Path(kit_dir)
    if kit_dir.exists() and any(kit_dir.iterdir()):
        raise KitError(str(kit_dir), "kit folder", "is not empty: give a new or empty folder")
    # the full profile exports GGUF with an importance matrix; the edge one serves (they travel anyway)
    tools = [share / "llama.cpp" / "bin" / name for name in LLAMA_TOOLS] if profile == "full" else []
    for need, what in ((share / "llama.cpp" / "convert_hf_to_gguf.py", "the GGUF converter"),
                       (share / "models", "the embedded default model"),
                       *((tool, f"llama.cpp's {tool.name}") for tool in tools)):
        if not need.exists():
            raise KitError(str(need), "set-up", f"{what} is missing: run `make setup` first")
    wheels = kit_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(checkout)], say)
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(share / "llama.cpp" / "gguf-py")], say)
    _run([*pip, "download", "-q", "--prefer-binary", "-d", str(wheels), "--find-links", str(wheels),
          "--find-links", str(cache / "wheels"), "-c", str(checkout / "requirements" / "constraints.txt"),
          f"appliance[{profile}]"], say)
    not_wheels = sorted(p.name for p in wheels.iterdir() if p.suffix != ".whl")
    if not_wheels:
        raise KitError(f"wheels/{not_wheels[0]}", "wheel", "is a source archive: the air-gapped box "
                       "has no compiler; pin a version with a wheel for this platform")
    shutil.copytree(share / "llama.cpp", kit_dir / "share" / "llama.cpp",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(share / "models", kit_dir / "share" / "models")
    shutil.copy2(Path(__file__), kit_dir / "verify.py")
    (kit_dir / "install.sh").write_text(INSTALL_SH, encoding="utf-8")
    (kit_dir / "install.sh").chmod(0o755)
    version = _wheel_version(wheels)
    sizes = {"wheels": sum(p.stat().st_size for p in wheels.iterdir()),
             "share": sum(p.stat().st_size for p in (kit_dir / "share").rglob("*") if p.is_file())}
    return write_manifest(kit_dir, profile=profile, target=Target.here(accelerator), version=version,
                          contents={"wheels": sorted(p.name for p in wheels.iterdir()), "bytes": sizes,
                                    "llama_tools": [f"share/llama.cpp/bin/{n}" for n in LLAMA_TOOLS]})


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
    b = sub.add_parser("build", help="build a kit (connected machine, after `make setup`)")
    b.add_argument("dir", type=Path)
    b.add_argument("--profile", choices=PROFILES, default="full")
    b.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    b.add_argument("--share", type=Path, default=Path(sys.prefix) / "share" / "appliance",
                   help="what `make setup` installed (default: this environment's)")
    b.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "appliance")
    r = sub.add_parser("record", help="note an install from a kit (the installer calls it)")
    r.add_argument("dir", type=Path)
    r.add_argument("share", type=Path)
    r.add_argument("--previous")
    args = parser.parse_args(argv)
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
        manifest = verify(args.dir, profile=args.profile)
    except KitError as exc:
        print(f"kit refused: {exc}\nnothing was installed", file=sys.stderr)
        return 2
    print(f"kit verified: {describe(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
