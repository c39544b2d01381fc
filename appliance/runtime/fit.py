"""Will these exports fit on the GPU? Device memory of a served model, estimated before it loads.

A model that does not fit a GPU fails deep inside llama.cpp or onnxruntime (an allocation error in
the middle of loading, sometimes a crash), after seconds of work, and several models on one card fail
only when the last one loads. The estimate is read from the artifact's header alone (a GGUF's
metadata, an ONNX folder's config.json), so `appliance exports fit` answers in milliseconds on a box
with no GPU too ("would it fit a 16 GB T4?"), and `serve` places models before it opens them:

    weights   every tensor on the device (the file's bytes: all layers are offloaded)
    kv cache  layers x context x kv-heads x (key + value width) x 2 bytes (an f16 cache; 4 for an
              ONNX graph whose cache is fp32: optimum's fp32, int8 and int4 exports)
    scratch   the runtime's compute buffer for one batch of `UBATCH` tokens: the logits
              (vocabulary x batch x 4) and, without flash attention, the attention scores
              (heads x context x batch x 4), plus the MLP's activations
    overhead  once per process: the CUDA context and the BLAS workspace

The constants are calibrated on a GPU host against what the engine process holds (nvidia-smi's
per-process memory after loading and generating), recorded in bench/results/gguf-gpu-h100.md: with
512 MiB of overhead the 0.5B shape's estimate was 11% under for Q4_K_M/Q8_0 (969/1112 MiB against
1092/1216 used) and exact for F16 (1510/1512); 640 MiB covers all three. One card and one shape so
far: the 8B shape and a T4 are still to measure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ValidationError

MIB = 1 << 20
GIB = 1 << 30
UBATCH = 512  # tokens per compute batch: llama-cpp-python's n_ubatch, the ONNX engine's prefill chunk
CUDA_OVERHEAD = 640 * MIB  # the CUDA context + cuBLAS workspace, once per process (H100, measured)
KV_BYTES = 2  # f16 keys and values
T4_GIB = 16.0  # the card the product is sized for when no GPU is here
MARGIN = 0.95  # of the free memory: fragmentation, the driver's own


@dataclass(frozen=True)
class Shape:
    """What the memory of a transformer decoder depends on."""

    layers: int
    heads: int
    kv_heads: int
    key_width: int  # per head
    value_width: int
    embedding: int
    feed_forward: int
    vocab: int


@dataclass(frozen=True)
class Footprint:
    """Device bytes one model needs at a context length (overhead not included: once per process)."""

    name: str
    context: int
    weights: int
    kv_cache: int
    scratch: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "context": self.context, "weights_mib": _mib(self.weights),
                "kv_cache_mib": _mib(self.kv_cache), "scratch_mib": _mib(self.scratch),
                "total_mib": _mib(self.total)}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def estimate(name: str, shape: Shape, weights: int, context: int, kv_bytes: int = KV_BYTES) -> Footprint:
    kv = shape.layers * context * shape.kv_heads * (shape.key_width + shape.value_width) * kv_bytes
    batch = min(UBATCH, context)
    scores = shape.heads * context * batch * 4
    logits = shape.vocab * batch * 4
    mlp = batch * (2 * shape.feed_forward + 4 * shape.embedding) * 4
    return Footprint(name, context, weights, kv, max(scores, logits) + mlp)


# -- shapes from the artifacts --------------------------------------------------------------------
def gguf_shape(path: Path) -> Shape:
    """The decoder's shape from a GGUF's metadata (`{arch}.block_count` ...)."""
    from appliance.runtime.template import GGUFArray, gguf_metadata

    meta = gguf_metadata(path, lambda k: k in ("general.architecture", "tokenizer.ggml.tokens")
                         or not k.startswith(("general.", "tokenizer.")))
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValidationError(f"{path}: no general.architecture in its metadata",
                              hint="export it again with the appliance")

    def num(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValidationError(f"{path}: no {arch}.{key} in its metadata",
                                  hint="export it again with the appliance")
        return int(value)

    embedding, heads = num("embedding_length"), num("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size", tokens.count if isinstance(tokens, GGUFArray) else 0)
    width = embedding // max(heads, 1)
    return Shape(layers=num("block_count"), heads=heads,
                 kv_heads=num("attention.head_count_kv", heads),
                 key_width=num("attention.key_length", width),
                 value_width=num("attention.value_length", width), embedding=embedding,
                 feed_forward=num("feed_forward_length", 4 * embedding), vocab=int(vocab))


def onnx_shape(folder: Path) -> Shape:
    """The decoder's shape from an ONNX export's config.json (the HF config it was exported from)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{folder / 'config.json'} cannot be read: {exc}",
                              hint="the ONNX folder must be self-contained; export it again") from None
    text = config.get("text_config", config) if isinstance(config, dict) else {}

    def num(key: str, default: int | None = None) -> int:
        value = text.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{folder / 'config.json'}: {key} is missing or not a number",
                                  hint="export it again with the appliance")
        return value

    embedding, heads = num("hidden_size"), num("num_attention_heads")
    width = num("head_dim") if text.get("head_dim") else embedding // max(heads, 1)
    return Shape(layers=num("num_hidden_layers"), heads=heads,
                 kv_heads=num("num_key_value_heads", heads), key_width=width, value_width=width,
                 embedding=embedding, feed_forward=num("intermediate_size", 4 * embedding),
                 vocab=num("vocab_size"))


def onnx_kv_bytes(folder: Path) -> int:
    """Bytes per cached key/value element of an ONNX export: what the export recorded beside the
    folder (`onnx_export.json`'s kv_dtype), else 2 for genai's builder graph (its cache is fp16), else
    4: optimum's graphs keep an fp32 cache but for fp16, and an unknown folder is counted high."""
    try:
        details = json.loads((folder.parent / "onnx_export.json").read_text(encoding="utf-8"))
        recorded = details.get("kv_dtype")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded in ("FLOAT16", "BFLOAT16"):
        return 2
    if recorded == "FLOAT":
        return 4
    return 2 if (folder / "genai_config.json").is_file() else 4


def onnx_weights(folder: Path) -> int:
    """Bytes of the graph and its external data (what onnxruntime puts on the device)."""
    return sum(f.stat().st_size for f in folder.iterdir()
               if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")))


def footprint(kind: str, path: Path, name: str, context: int) -> Footprint:
    """The footprint of a GGUF file or an ONNX folder at `context` tokens."""
    if context < 16:  # what open_engine accepts
        raise ValidationError(f"context is {context}", hint="a context of 16 tokens or more")
    if kind == "gguf":
        return estimate(name, gguf_shape(path), path.stat().st_size, context)
    if kind == "onnx":
        return estimate(name, onnx_shape(path), onnx_weights(path), context, onnx_kv_bytes(path))
    raise ValidationError(f"unknown artifact kind {kind!r}", hint="gguf or onnx")


# -- placing models on a card ---------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Which models go on the GPU, in the order asked, and what they need of the card."""

    on_gpu: tuple[str, ...]
    on_cpu: tuple[str, ...]
    needed: int  # bytes the GPU models need, the overhead included

    @property
    def fits(self) -> bool:
        return not self.on_cpu


def place(footprints: Sequence[Footprint], card_bytes: int) -> Placement:
    """Models on the GPU in order while they fit `card_bytes` (after the per-process overhead);
    a model that does not fit goes to the CPU and the next is tried."""
    used = CUDA_OVERHEAD
    gpu: list[str] = []
    cpu: list[str] = []
    for f in footprints:
        if used + f.total <= card_bytes:
            gpu.append(f.name)
            used += f.total
        else:
            cpu.append(f.name)
    return Placement(tuple(gpu), tuple(cpu), used if gpu else 0)


def usable_bytes(free_mib: float) -> int:
    """What may be planned of a GPU's free memory."""
    return int(free_mib * MIB * MARGIN)


def describe(footprints: Iterable[Footprint]) -> list[str]:
    """One line per model: its parts in MiB."""
    return [f"{f.name}: {_mib(f.total):,.0f} MiB at {f.context:,} tokens (weights "
            f"{_mib(f.weights):,.0f}, KV cache {_mib(f.kv_cache):,.0f}, scratch {_mib(f.scratch):,.0f})"
            for f in footprints]


def default_context(kind: str, path: Path) -> int:
    """The context an engine opens the artifact with when none is asked (the engines' own rule)."""
    if kind == "gguf":
        from appliance.runtime.llama_engine import gguf_context_length, pick_context

        return pick_context(None, gguf_context_length(path))
    from appliance.runtime.onnx_engine import default_context as onnx_default

    return onnx_default(path, onnx_trained_context(path))


def context_for(kind: str, path: Path, asked: int | None) -> int:
    """The context to plan for: `asked`, refused beyond what the model was trained on (the
    engines never serve past it), else the engines' own default."""
    from appliance.runtime.llama_engine import gguf_context_length, pick_context

    if asked is None:
        return default_context(kind, path)
    return pick_context(asked, gguf_context_length(path) if kind == "gguf" else onnx_trained_context(path))


def onnx_trained_context(folder: Path) -> int | None:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
            "max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True)
class Card:
    """The memory a plan is made against: a GPU of this box, or one named by size."""

    label: str
    total_bytes: int
    free_bytes: int


def this_card(card_gib: float | None) -> Card:
    """`card_gib` when given; else GPU 0 of this box (its free memory); else a 16 GiB T4-class card."""
    if card_gib is not None:
        if not 0 < card_gib <= 4096:
            raise ValidationError(f"card size is {card_gib} GiB", hint="--card-gib: e.g. 16 for a T4")
        size = int(card_gib * GIB)
        return Card(f"a {card_gib:g} GiB card", size, size)
    from appliance import gpus

    found, _ = gpus.read_gpus()
    if found:
        g = found[0]
        return Card(f"GPU {g.index} ({g.name}, {g.memory_total_mib / 1024:.1f} GiB, "
                    f"{g.free_gib:.1f} GiB free)", int(g.memory_total_mib * MIB),
                    usable_bytes(g.memory_total_mib - g.memory_used_mib))
    return Card(f"a {T4_GIB:g} GiB T4-class card (no GPU here)", int(T4_GIB * GIB), int(T4_GIB * GIB))


def report(footprints: Sequence[Footprint], card: Card) -> tuple[Placement, list[str]]:
    """The placement on `card` and the lines that explain it."""
    placement = place(footprints, card.free_bytes)
    lines = describe(footprints)
    lines.append(f"+ {CUDA_OVERHEAD // MIB} MiB for the CUDA context and its workspace, once per server")
    need = CUDA_OVERHEAD + sum(f.total for f in footprints)
    if placement.fits:
        lines.append(f"fits {card.label}: {_mib(need):,.0f} MiB of {_mib(card.free_bytes):,.0f} "
                     "MiB usable")
    else:
        lines.append(f"does not fit {card.label}: {_mib(need):,.0f} MiB needed, "
                     f"{_mib(card.free_bytes):,.0f} MiB usable; on the GPU: "
                     f"{', '.join(placement.on_gpu) or 'none'}; left for the CPU: "
                     f"{', '.join(placement.on_cpu)}")
    return placement, lines
