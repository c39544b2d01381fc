"""manifest.json: what makes every artifact directory self-describing and checkable.

A manifest names the artifact's kind, its parents (lineage), every file with size and sha256, the
config that made it, the package versions, and free-form info/metrics. `verify` recomputes the
hashes, so a changed byte, a missing file or an extra file is detected on read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import IntegrityError, ValidationError
from appliance.fsutil import atomic_write_json, sha256_file
from appliance.versions import installed_versions

MANIFEST = "manifest.json"
SCHEMA = 1


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def list_files(root: Path) -> list[Path]:
    """Every regular file under root except the manifest itself, sorted, as relative paths."""
    files = [p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return sorted(p for p in files if p.as_posix() != MANIFEST)


def hash_files(root: Path, progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    return {
        rel.as_posix(): {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel, progress)}
        for rel in list_files(root)
    }


def build(
    root: Path,
    *,
    kind: str,
    name: str,
    parents: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    status: str = "ready",
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": kind,
        "name": name,
        "status": status,
        "created": now_iso(),
        "parents": parents or [],
        "files": hash_files(root, progress),
        "config": config or {},
        "info": info or {},
        "metrics": metrics or {},
        "versions": installed_versions(),
    }


def write(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST
    atomic_write_json(path, manifest)
    return path


def read(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(
            f"{root} has no {MANIFEST}: it is not a finished artifact",
            hint="re-create it (import/export again) or remove the directory",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON: {exc}") from None
    for field in ("schema", "kind", "name", "files"):
        if field not in data:
            raise ValidationError(f"{path}: field {field!r} is missing")
    return data


def problems(root: Path, manifest: dict[str, Any] | None = None, *, full: bool = True) -> list[str]:
    """Differences between the files on disk and the manifest. `full=False` checks sizes only."""
    manifest = manifest or read(root)
    recorded: dict[str, dict[str, Any]] = manifest["files"]
    found = {p.as_posix() for p in list_files(root)}
    issues = [f"missing file: {rel}" for rel in sorted(set(recorded) - found)]
    issues += [f"unexpected file: {rel}" for rel in sorted(found - set(recorded))]
    for rel in sorted(set(recorded) & found):
        path = root / rel
        if path.stat().st_size != recorded[rel]["size"]:
            issues.append(f"size changed: {rel} ({path.stat().st_size} != {recorded[rel]['size']})")
        elif full and sha256_file(path) != recorded[rel]["sha256"]:
            issues.append(f"content changed (sha256 mismatch): {rel}")
    return issues


def verify(root: Path, *, full: bool = True) -> dict[str, Any]:
    """Read and check a manifest; raise IntegrityError naming every differing file."""
    manifest = read(root)
    found = problems(root, manifest, full=full)
    if found:
        raise IntegrityError(
            f"{root} does not match its manifest:\n  " + "\n  ".join(found),
            hint="the artifact was modified or damaged after it was written; re-create it",
        )
    return manifest
