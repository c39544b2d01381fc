"""Every module of the TUI, screens included, imports without the ML stack (torch would add seconds
and hundreds of MiB to the first paint). tests/unit/test_layers.py checks the top-level package;
this walks the subpackages too, in a fresh interpreter."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import tui

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "optimum", "onnxruntime", "llama_cpp",
         "numpy", "tokenizers"}


def test_no_tui_module_imports_the_ml_stack() -> None:
    modules = [m.name for m in pkgutil.walk_packages(tui.__path__, prefix="tui.")]
    assert "tui.screens.train" in modules and "tui.screens.datasets" in modules
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    loaded = set(json.loads(out.stdout))
    assert "textual" in loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
