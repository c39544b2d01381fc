"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.demo import sample_dataset
from appliance.stages.datasets import importer as datasets
from appliance.stages.models import importer as models
from appliance.workspace import Workspace


@pytest.fixture
def train_ws(tmp_path: Path, tiny_llama: Path) -> Workspace:
    """A workspace with the tiny Llama ("tiny") and 30 real conversations ("small", 20% eval)."""
    ws = Workspace(tmp_path / "ws")
    model = models.import_path(ws, tiny_llama, name="tiny")
    lines = sample_dataset().read_text(encoding="utf-8").splitlines()[:30]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    datasets.import_file(ws, small, model, name="small", eval_fraction=0.2)
    return ws
