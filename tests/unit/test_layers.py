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


def loaded_after_import(modules: list[str]) -> set[str]:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("package", ["appliance", "export"])
def test_core_never_imports_textual(package: str) -> None:
    loaded = loaded_after_import(_modules(package))
    assert "textual" not in loaded and "tui" not in loaded


def test_tui_does_not_import_the_ml_stack() -> None:
    loaded = loaded_after_import(_modules("tui"))
    assert "textual" in loaded  # the check is live: the TUI really was imported
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_runtime_is_torch_free() -> None:
    """The server and console load fast and small: no torch/transformers/peft in the runtime."""
    loaded = loaded_after_import(_modules("appliance.runtime"))
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


def _cycles(graph: object, package: str) -> list[list[str]]:
    """Strongly connected groups (more than one module) of `package`'s import graph, imports inside
    functions included: a lazy import hides a cycle from the interpreter, not from a reader."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))  # type: ignore[attr-defined]
    edges = {m: {n for n in graph.find_modules_directly_imported_by(m) if n in modules}  # type: ignore[attr-defined]
             for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in modules:
        if m not in index:
            visit(m)
    return found


@pytest.mark.parametrize("package", ["appliance", "export", "tui"])
def test_no_import_cycles_inside_a_package(package: str) -> None:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (requirements/dev.txt)")
    # TYPE_CHECKING imports count too: a type named across a cycle is still a cycle to a reader
    graph = grimp.build_graph(package, exclude_type_checking_imports=False)
    assert len(graph.modules) > 3  # the check is live
    assert _cycles(graph, package) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (requirements/dev.txt)")
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from loopy import b\n")
    (pkg / "b.py").write_text("from loopy import a\n")
    (pkg / "c.py").write_text("from loopy import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("loopy", cache_dir=None), "loopy") == [["loopy.a", "loopy.b"]]
