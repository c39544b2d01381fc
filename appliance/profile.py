"""Which profile this install is, and the offline kit it came from.

The appliance installs in two profiles (see `appliance/kit.py`): `full`, the training box (torch,
transformers, peft, ...), and `edge`, serve and chat only (llama-cpp-python, onnxruntime,
tokenizers, ... but no torch, no transformers). The profile is what is importable, found with
`importlib.util.find_spec` (nothing is imported: `appliance --help` stays light); setting
`APPLIANCE_PROFILE=edge` makes a full install behave as an edge one (to try the edge experience on a
training box; no value makes an edge install full).

Code that needs the full profile calls `require_full("training")` first, so an edge install says so
in one line instead of failing on an ImportError halfway through.

The kit: an install from an offline kit leaves `<share>/kit.json` (`stack.share_dir()`: the kit's
appliance_version, profile, created, target, and when it was installed) and appends to
`<share>/kit-history.json`, a JSON list of installs, oldest first, each at least
`{"appliance_version", "profile", "installed"}` (the installer, `appliance/kit.py record`, adds
`created`, `target` and `previous_version`). This module only reads them; a missing or damaged file
reads as "no kit".
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import stack
from appliance.errors import RefusedError

FULL, EDGE = "full", "edge"
PROFILES = (FULL, EDGE)
# What makes an install `full`: training needs all three.
FULL_MODULES = ("torch", "transformers", "peft")
# Every module only the full profile installs (a missing one is a one-line error, not a traceback).
FULL_ONLY = frozenset({*FULL_MODULES, "bitsandbytes", "accelerate", "optimum", "onnx", "onnx_ir",
                       "safetensors", "sentencepiece"})
OVERRIDE_ENV = "APPLIANCE_PROFILE"
KIT_FILE = "kit.json"
HISTORY_FILE = "kit-history.json"
HISTORY_KEPT = 20  # installs read back from the history (the newest)
FULL_HINT = ("install the full profile: from a full kit, `make setup KIT=DIR` in the appliance "
             "checkout or the kit's ./install.sh")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken parent package, or sys.modules[name] = None
        return False


def missing_for_full() -> list[str]:
    """The modules of FULL_MODULES this install cannot import (empty on a full install)."""
    return [name for name in FULL_MODULES if not _importable(name)]


def current() -> str:
    """`full` when torch, transformers and peft are importable (and APPLIANCE_PROFILE is not
    `edge`), else `edge`."""
    if os.environ.get(OVERRIDE_ENV, "").strip().lower() == EDGE:
        return EDGE
    return FULL if not missing_for_full() else EDGE


def is_full() -> bool:
    return current() == FULL


def require_full(what: str) -> None:
    """Refuse `what` (e.g. "training") on an edge install, in one line, saying how to get the
    full profile."""
    if current() != FULL:
        raise RefusedError(f"{what} needs the full profile (this install is the edge profile)",
                           title="Not on this profile", hint=FULL_HINT)


# -- the kit ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KitInstall:
    """One install from a kit: what `kit.json` / a `kit-history.json` entry says."""

    appliance_version: str | None
    profile: str | None
    created: str | None = None  # when the kit was built
    installed: str | None = None  # when it was installed here
    target: str | None = None  # "Python 3.11 linux_x86_64 cpu"
    previous_version: str | None = None  # the appliance version installed before this one

    @classmethod
    def from_json(cls, data: Any) -> KitInstall | None:
        if not isinstance(data, dict):
            return None

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) and value else None

        install = cls(text("appliance_version"), text("profile"), text("created"),
                      text("installed"), _target(data.get("target")), text("previous_version"))
        return install if install.appliance_version or install.profile else None

    def describe(self) -> str:
        """`appliance 1.2.0 edge kit, built 2025-..., for Python 3.11 linux_x86_64 cpu`."""
        parts = [f"appliance {self.appliance_version or '?'} {self.profile or '?'} kit"]
        if self.created:
            parts.append(f"built {self.created}")
        if self.target:
            parts.append(f"for {self.target}")
        if self.installed:
            parts.append(f"installed {self.installed}")
        return ", ".join(parts)


def _target(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if not isinstance(value, dict):
        return None
    words = [str(value[k]) for k in ("python", "platform", "accelerator") if value.get(k)]
    if value.get("python"):
        words[0] = f"Python {words[0]}"
    return " ".join(words) or None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def kit(share: Path | None = None) -> KitInstall | None:
    """The kit this install came from (`<share>/kit.json`), or None (not installed from a kit)."""
    return KitInstall.from_json(_read_json((share or stack.share_dir()) / KIT_FILE))


def kit_history(share: Path | None = None) -> list[KitInstall]:
    """Installs from kits, oldest first (the last HISTORY_KEPT); unreadable entries are skipped."""
    data = _read_json((share or stack.share_dir()) / HISTORY_FILE)
    if not isinstance(data, list):
        return []
    found = [KitInstall.from_json(entry) for entry in data[-HISTORY_KEPT:]]
    return [entry for entry in found if entry is not None]


def previous_kit(share: Path | None = None) -> KitInstall | None:
    """The install before the current kit: the newest history entry older than the current one
    whose version differs (a reinstall of the same kit is not a previous version); else the version
    the installer found before this kit (`previous_version`), when it recorded one."""
    current_kit = kit(share)
    history = kit_history(share)
    if current_kit is not None and history and history[-1].installed == current_kit.installed:
        history = history[:-1]
    now = current_kit.appliance_version if current_kit else None
    found = next((entry for entry in reversed(history) if entry.appliance_version != now), None)
    if found is None and current_kit is not None and current_kit.previous_version \
            and current_kit.previous_version != now:
        return KitInstall(current_kit.previous_version, None)
    return found


def describe() -> dict[str, Any]:
    """The profile and the kit, for `appliance doctor` (JSON-ready)."""
    here, previous = kit(), previous_kit()
    return {
        "profile": current(),
        "missing_for_full": missing_for_full(),
        "forced": os.environ.get(OVERRIDE_ENV, "").strip().lower() == EDGE,
        "kit": None if here is None else {
            "appliance_version": here.appliance_version, "profile": here.profile,
            "created": here.created, "installed": here.installed, "target": here.target},
        "previous_kit": None if previous is None else {
            "appliance_version": previous.appliance_version, "profile": previous.profile,
            "installed": previous.installed},
    }
