"""The layers stay apart: the core and export never import Textual; the TUI never imports the ML
stack at module scope. Each check runs in a fresh interpreter so nothing is already imported."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "optimum", "onnxruntime", "llama_cpp")


def _modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    return [package] + [m.name for m in pkgutil.walk_packages([str(path)], prefix=f"{package}.")
                        if not m.name.endswith("__main__")]


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("package", ["appliance", "export"])
def test_core_never_imports_textual(package: str) -> None:
    loaded = _loaded_after_import(_modules(package))
    assert "textual" not in loaded and "tui" not in loaded


def test_tui_does_not_import_the_ml_stack() -> None:
    loaded = _loaded_after_import(_modules("tui"))
    assert "textual" in loaded  # the check is live: the TUI really was imported
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_runtime_is_torch_free() -> None:
    """The server and console load fast and small: no torch/transformers/peft in the runtime."""
    loaded = _loaded_after_import(_modules("appliance.runtime"))
    assert "aiohttp" in loaded  # the check is live: the server module really was imported
    assert not loaded & {"torch", "transformers", "peft", "bitsandbytes", "optimum"}


def test_cli_help_does_not_import_the_ml_stack() -> None:
    code = ("import contextlib, io, json, sys\nfrom appliance import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['--help'])\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {*HEAVY, "textual"}, sorted(loaded & {*HEAVY, "textual"})
