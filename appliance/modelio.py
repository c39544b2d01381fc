"""Reading model files without loading (or unpickling) them.

safetensors files start with an 8-byte length and a JSON header describing every tensor; reading
that header gives names, shapes and dtypes, so shard checks and parameter counts need no torch.
GGUF metadata is read with llama.cpp's own gguf-py (the version-locked copy setup installs).
A tokenizer.model is checked with the SentencePiece library itself, the parser llama.cpp's
converter uses, so what passes here also passes there.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from appliance.errors import ValidationError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 * 1024 * 1024
MAX_SENTENCEPIECE = 64 * 1024 * 1024  # real ones are a few MB; a GGUF under that name is GBs
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    end: int  # end of its data, relative to the data section


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor table of a safetensors file; raises ValidationError if it is truncated or corrupt."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValidationError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise ValidationError(f"{path}: not a safetensors file (header length {length})")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValidationError(f"{path}: corrupt safetensors header: {exc}") from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]),
                                       int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError) as exc:
            raise ValidationError(f"{path}: corrupt entry for tensor {name!r}: {exc}") from None
    data_size = size - 8 - length
    needed = max((t.end for t in tensors.values()), default=0)
    if needed > data_size:
        raise ValidationError(
            f"{path}: truncated: tensors need {needed} bytes of data but the file holds "
            f"{data_size}", hint="copy the file again from its source")
    return tensors


def weights_summary(files: list[Path]) -> dict[str, Any]:
    """Parameter count and dominant dtype over all safetensors files."""
    params = 0
    dtypes: Counter[str] = Counter()
    for path in files:
        for info in read_safetensors_header(path).values():
            n = prod(info.shape)
            params += n
            dtypes[info.dtype] += n
    return {"parameters": params, "dtype": dtypes.most_common(1)[0][0] if dtypes else None}


def check_shards(folder: Path) -> list[Path]:
    """The safetensors files that make up the model; raises on missing or mismatched shards."""
    index_path = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("*.safetensors"))
    if not index_path.exists():
        if len(shards) > 1:
            raise ValidationError(
                f"{folder}: {len(shards)} safetensors files but no model.safetensors.index.json",
                hint="copy the index file that came with the shards")
        if shards:
            read_safetensors_header(shards[0])
        return shards
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValidationError(f"{index_path}: not a valid shard index: {exc}") from None
    expected: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        expected.setdefault(shard, set()).add(tensor)
    missing = sorted(s for s in expected if not (folder / s).is_file())
    if missing:
        raise ValidationError(f"{folder}: missing shard(s) listed in {index_path.name}: "
                              f"{', '.join(missing)}", hint="copy the complete model folder")
    for shard, names in sorted(expected.items()):
        found = set(read_safetensors_header(folder / shard))
        if found != names:
            diff = sorted(names ^ found)
            raise ValidationError(
                f"{folder / shard}: does not match {index_path.name} ({len(diff)} tensor(s) "
                f"differ, e.g. {diff[0]!r})", hint="the shards come from different versions; "
                "copy the complete model folder again")
    stray = sorted(p.name for p in shards if p.name not in expected)
    if stray:
        raise ValidationError(f"{folder}: safetensors file(s) not in {index_path.name}: "
                              f"{', '.join(stray)}")
    return [folder / s for s in sorted(expected)]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (token tables are summarised by length)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf-py raises ValueError/struct errors on bad files
        if "reshape" in str(exc) or "mmap length" in str(exc):  # its tensors run past the end
            raise ValidationError(f"{path}: not a readable GGUF file: it is truncated or damaged (its "
                                  f"tensors do not fit its {path.stat().st_size:,} bytes: {exc})",
                                  hint="copy the file again and compare its size and sha256 with "
                                       "the original") from None
        raise ValidationError(f"{path}: not a readable GGUF file: {exc}") from None
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if len(fld.data) > 64:
            meta[key] = f"<{len(fld.data)} entries>"
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # an exotic field type: keep going, it is informational
            meta[key] = None
    meta["_tensor_count"] = len(reader.tensors)
    meta["_parameters"] = int(sum(int(prod(t.shape)) for t in reader.tensors))
    return meta


def sentencepiece_problem(path: Path) -> str | None:
    """Why `path` is not a SentencePiece model, or None if SentencePiece loads it with pieces.

    A GGUF is recognised by its magic (transformers saves the GGUF it loaded a tokenizer from
    under this name); anything else must parse as a ModelProto in SentencePiece's own loader,
    which is what llama.cpp's converter calls ("could not parse ModelProto" otherwise)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if head == GGUF_MAGIC:
        return "it is a GGUF file"
    if size == 0:
        return "it is empty"
    if size > MAX_SENTENCEPIECE:
        return f"it is {size // 2**20} MiB, far larger than any SentencePiece model"
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
    except (RuntimeError, OSError, TypeError):
        return "SentencePiece cannot parse it as a ModelProto"
    return None if processor.get_piece_size() > 0 else "it holds no pieces"
