"""Every module of the TUI, screens included, imports without the ML stack (torch would add seconds
and hundreds of MiB to the first paint). tests/unit/test_layers.py checks the top-level package;
this walks the subpackages too, in a fresh interpreter."""

from __future__ import annotations

import pkgutil

import tui
from tests.unit.test_layers import loaded_after_import

HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "optimum", "onnxruntime", "llama_cpp",
         "numpy", "tokenizers"}


def test_no_tui_module_imports_the_ml_stack() -> None:
    modules = [m.name for m in pkgutil.walk_packages(tui.__path__, prefix="tui.")]
    assert "tui.screens.train" in modules and "tui.screens.datasets" in modules
    loaded = loaded_after_import(modules)
    assert "textual" in loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
