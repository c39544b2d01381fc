"""ONNX export refuses bad requests up front, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import ApplianceError, RefusedError, ValidationError
from export.onnx import export_onnx, quantize_onnx


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """Just enough of an HF folder to get past the file checks (nothing here is ever loaded)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_unknown_precision_lists_the_valid_ones(fake_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as err:
        export_onnx(fake_model, tmp_path / "out", "q4_k_m")
    assert "q4_k_m" in str(err.value) and "fp32, fp16, int4, int8" in str(err.value)
    with pytest.raises(ValidationError) as err:
        quantize_onnx(fake_model, tmp_path / "out", "fp16")
    assert "int4, int8" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_source_without_a_fast_tokenizer_is_refused(fake_model: Path, tmp_path: Path) -> None:
    (fake_model / "tokenizer.json").unlink()
    with pytest.raises(ValidationError, match=r"tokenizer\.json"):
        export_onnx(fake_model, tmp_path / "out", "fp32")


def test_custom_code_is_refused(fake_model: Path, tmp_path: Path) -> None:
    (fake_model / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(RefusedError, match="auto_map"):
        export_onnx(fake_model, tmp_path / "out", "fp32")


def test_a_non_empty_target_is_not_overwritten(fake_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ApplianceError) as err:
        export_onnx(fake_model, target, "fp32")
    assert err.value.title == "Already exists"
    assert (target / "keep.txt").read_text() == "mine"


def test_quantize_needs_an_onnx_folder(fake_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"model\.onnx"):
        quantize_onnx(fake_model, tmp_path / "out", "int4")
