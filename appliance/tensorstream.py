"""Read and write safetensors files one tensor at a time, so a merge holds one tensor, not a model.

`safetensors.safe_open` maps the whole file: every page it touches stays resident (and counts in
the process's RSS) until the file is closed, and `save_file` needs every output tensor in memory at
once. For a one-shard 0.5B model that made the merge peak at 3.3x the fp16 model. Here the input is
read with plain positioned reads into a buffer the size of one tensor, and the output header is
computed up front from names, dtypes and shapes (all known before any data is merged), so each
merged tensor is written as soon as it exists and dropped. The format is the published one (8-byte
little-endian header length, JSON header padded with spaces to 8 bytes, contiguous data); a
test checks the files against the safetensors library both ways, and every merge is loaded back by
transformers for its logit check.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from appliance.errors import ValidationError
from appliance.modelio import read_safetensors_header

ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}
ALIGN = 8


def torch_dtypes() -> dict[str, Any]:
    import torch

    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
            "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def dtype_name(dtype: Any) -> str:
    return {v: k for k, v in torch_dtypes().items()}[dtype]


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # offsets within the data section
    end: int = 0

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * ITEM_SIZE[self.dtype]


def entries(path: Path) -> tuple[list[Entry], int]:
    """The file's tensors in data order, and where the data section starts."""
    read_safetensors_header(path)  # validates length, JSON and truncation
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    found = []
    for name, item in header.items():
        if name == "__metadata__":
            continue
        if item["dtype"] not in ITEM_SIZE:
            raise ValidationError(f"{path}: tensor {name!r} has dtype {item['dtype']}, which the "
                                  "merge does not handle")
        begin, end = (int(x) for x in item["data_offsets"])
        found.append(Entry(name, item["dtype"], tuple(item["shape"]), begin, end))
    return sorted(found, key=lambda e: e.begin), 8 + length


def read_tensors(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, tensor) in file order; each tensor is a fresh buffer, nothing else stays resident."""
    import torch

    table, start = entries(path)
    dtypes = torch_dtypes()
    with open(path, "rb", buffering=0) as fh:
        for entry in table:
            size = entry.end - entry.begin
            if size != entry.nbytes:
                raise ValidationError(f"{path}: tensor {entry.name!r} holds {size} bytes, its shape "
                                      f"and dtype need {entry.nbytes}")
            if size == 0:
                yield entry.name, torch.empty(entry.shape, dtype=dtypes[entry.dtype])
                continue
            buf = bytearray(size)
            _read_exactly(fh.fileno(), buf, start + entry.begin, path, entry.name)
            yield entry.name, torch.frombuffer(buf, dtype=dtypes[entry.dtype]).reshape(entry.shape)


def _read_exactly(fd: int, buf: bytearray, offset: int, path: Path, name: str) -> None:
    """Fill `buf` from `offset`; Linux returns at most ~2 GiB per read, and a 7B model's fp32
    embedding is larger."""
    view, done = memoryview(buf), 0
    while done < len(buf):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValidationError(f"{path}: short read of tensor {name!r} (file truncated?)")
        done += got


class TensorFileWriter:
    """Writes tensors in a fixed order into a safetensors file whose header is written first."""

    def __init__(self, path: Path, specs: Sequence[Entry], metadata: dict[str, str] | None = None
                 ) -> None:
        self.path, self._order, self._next = path, [s.name for s in specs], 0
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._sizes = {}
        for spec in specs:
            header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            self._sizes[spec.name] = (spec.dtype, spec.shape)
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % ALIGN)
        self._fh = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Any) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise RuntimeError(f"{self.path}: tensor {name!r} written out of order")
        dtype, shape = self._sizes[name]
        if dtype_name(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                               f"the header says {dtype} {tuple(shape)}")
        if tensor.numel():
            import torch

            self._fh.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors never written")

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._fh.close()
            return
        self.close()

