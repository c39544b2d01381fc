"""Folders for a test module's shared fixtures that are removed when the module is done.

The suite must fit a CI disk of unknown size: a full run used to leave ~20 GB behind (merged models,
ONNX graphs, GGUF files), because pytest keeps every `tmp_path_factory` folder until the session
ends. With `tmp_path_retention_policy = "failed"` (pyproject) a passing test's `tmp_path` goes at
its teardown; module-scoped fixtures take their folders from here, so they go with the module."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


class ModuleTemp:
    """`mktemp` as `tmp_path_factory` spells it, inside one folder that the module's teardown
    removes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory,
               request: pytest.FixtureRequest) -> Iterator[ModuleTemp]:
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield ModuleTemp(root)
    shutil.rmtree(root, ignore_errors=True)
