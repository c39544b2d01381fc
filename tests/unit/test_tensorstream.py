"""Streaming safetensors I/O against the safetensors library, both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from appliance import tensorstream
from appliance.errors import ValidationError


def _sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(9, generator=g).to(torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.empty": torch.empty(0, 4),
        "f.mask": torch.tensor([True, False, True]),
    }


def test_reads_what_the_library_wrote(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    expected = _sample()
    save_file(expected, str(path))
    got = dict(tensorstream.read_tensors(path))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_library_reads_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "y.safetensors"
    tensors = _sample()
    specs = [tensorstream.Entry(k, tensorstream.dtype_name(v.dtype), tuple(v.shape))
             for k, v in tensors.items()]
    with tensorstream.TensorFileWriter(path, specs, {"format": "pt"}) as out:
        for key, value in tensors.items():
            out.write(key, value)
    got = load_file(str(path))
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_writer_refuses_order_and_shape_mistakes(tmp_path: Path) -> None:
    specs = [tensorstream.Entry("a", "F32", (2,)), tensorstream.Entry("b", "F32", (2,))]
    with pytest.raises(RuntimeError, match="out of order"), \
            tensorstream.TensorFileWriter(tmp_path / "z.safetensors", specs) as out:
        out.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="header says"), \
            tensorstream.TensorFileWriter(tmp_path / "z.safetensors", specs) as out:
        out.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="never written"), \
            tensorstream.TensorFileWriter(tmp_path / "z.safetensors", specs) as out:
        out.write("a", torch.zeros(2))


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_sample(), str(path))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValidationError, match="truncated"):
        list(tensorstream.read_tensors(path))


def test_scoring_falls_back_to_bf16_when_fp32_copies_do_not_fit(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import psutil

    from appliance.stages.merge.weights import scoring_dtype

    save_file({"w": torch.zeros(1000, 1000)}, str(tmp_path / "model.safetensors"))  # 1M parameters
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=9_000_000))
    assert scoring_dtype(tmp_path) == torch.float32  # 4 MB <= 4.5 MB
    assert scoring_dtype(tmp_path, copies=2) == torch.bfloat16  # 8 MB > 4.5 MB


def test_short_reads_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux returns at most ~2 GiB per read: a bigger tensor arrives in pieces."""
    import os

    path = tmp_path / "p.safetensors"
    expected = _sample()
    save_file(expected, str(path))
    real = os.preadv

    def at_most_3_bytes(fd: int, buffers: list, offset: int) -> int:
        return real(fd, [memoryview(buffers[0])[:3]], offset)

    monkeypatch.setattr(tensorstream.os, "preadv", at_most_3_bytes)
    got = dict(tensorstream.read_tensors(path))
    assert all(torch.equal(got[k], v) for k, v in expected.items())
