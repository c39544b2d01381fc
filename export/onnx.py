"""HF folder -> ONNX (with a KV cache), and a light runner for the result.

Why ONNX: onnxruntime serves the model on CPUs and on CUDA GPUs (onnxruntime-gpu, T4-class) from one
self-contained folder, without torch or transformers at run time.

Export (`export_onnx`) runs optimum's exporter on the local folder (task text-generation-with-past:
one decoder graph taking input_ids, attention_mask, position_ids and past_key_values.N.key/value,
returning logits and present.N.key/value), then, per precision:
- fp32: the graph as exported;
- fp16: built by onnxruntime-genai's model builder for CUDA (GroupQueryAttention, fused rotary and
  norms: ~12 nodes a layer against optimum's ~100, whose shape arithmetic ran on the host between
  the GPU's kernels and kept a 0.5B model at ~2% of an H200's bandwidth limit, 10x slower than
  genai: bench/results/onnx-gpu-h200.md). Same inputs and outputs as optimum's graph (no
  position_ids), so `OnnxLM` runs it on the CPU and for scoring; on CUDA the runtime serves it
  through genai's generator. Needs no GPU to build. An architecture the builder does not know falls
  back to optimum's graph loaded in fp16, with a line saying so; its past/present and logits are fp16;
- int4: weight-only MatMulNBits quantization of the fp32 graph (block 32, asymmetric, accuracy level 4:
  int8 compute on CPU), some MatMuls at 8 bits: the head (the logits MatMul, as llama.cpp's Q4_K_M
  keeps its output matrix at 6 bits) and either a measured layout (`keep_8bit`: the matrices most
  sensitive per byte on the run's data, `export.sensitivity`, chosen by the export stage) or the
  fixed list (`INT4_KEEP_8BIT`) at the same bytes;
- int4-cuda: what a T4 serves. The same int4 MatMulNBits quantization and 8-bit layout, applied to the
  fp16 graph genai's builder makes (q, k and v kept as separate MatMuls, so that a layout can keep one
  of them at 8 bits): fp16 activations, GroupQueryAttention, served by genai's generator on CUDA.
  It runs on the CPU too (the parity gate and eval score it there), only slower than `int4`, which
  is the CPU's. Needs onnxruntime-genai and an architecture its builder knows; else refused;
- int8: the same with 8-bit weights everywhere. Not `quantize_dynamic`: its per-tensor uint8
  activations wrecked SmolLM2 (mean KL to fp32 0.59, worse than int4's 0.33; 8-bit MatMulNBits 0.006).
Tied embeddings export as `MatMul(x, Transpose(embedding))`, which the quantizer skips (its B is not
a constant), so the head first gets its own pre-transposed constant. Graphs over ~1.8 GB of weights
keep them in one `model.onnx_data` beside `model.onnx`. The tokenizer and config files are copied
beside the graph. The folder is built under a hidden `.partial` sibling and renamed into place once
the graph has run once; on any failure the partial output is removed and an `ApplianceError` says why.

Run (`OnnxLM`): onnxruntime + numpy + tokenizers only: whole-sequence logits for scoring, greedy
generation with the KV cache, and `prefill`/`decode` steps for a sampler to build on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ApplianceError, RefusedError, ValidationError

LineSink = Callable[[str], None]  # where progress lines go, one call per line

PRECISIONS = ("fp32", "fp16", "int4", "int8", "int4-cuda")
QUANTIZED = ("int4", "int8")
INT4_CUDA = "int4-cuda"
TASK = "text-generation-with-past"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
GENAI_DATA_FILE = "model.onnx.data"  # onnxruntime-genai's builder's name for the weights
GENAI_CONFIG = "genai_config.json"
BUILDER_WRITES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json", "config.json")
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf refuses messages over 2 GiB
NBITS = {"block_size": 32, "is_symmetric": False, "accuracy_level": 4}
# Kept at 8 bits in int4 exports, as llama.cpp's Q4_K_M keeps them at 6: on SmolLM2 + adapter,
# symmetric all-4-bit gave +112% perplexity (KL 0.75), asymmetric +37%, asymmetric with these at
# 8 bits +14% (KL 0.13) for 17 MiB more (thresholds: appliance/stages/verify/parity.py;
# bench/results/parity-smollm2.md).
INT4_KEEP_8BIT = ("down_proj", "v_proj")
TITLE = "ONNX export failed"
PREFILL_CHUNK = 512
CUDA_HINT = ("the CUDA provider needs onnxruntime-gpu (1.31: built for CUDA 13) with the CUDA 13 runtime, "
             "cuBLAS and cuDNN 9 libraries (set-up on a CUDA box installs them), and an NVIDIA driver; "
             "or run on the CPU (--cpu)")


def _quiet(_: str) -> None:
    pass


# -- export -----------------------------------------------------------------------------------
def export_onnx(model_dir: Path, out_dir: Path, precision: str,
                progress: LineSink | None = None, keep_8bit_modules: Collection[str] | None = None
                ) -> dict[str, Any]:
    """Export the HF folder `model_dir` to an ONNX folder `out_dir`; returns what was written.
    int4-cuda: `keep_8bit_modules` names the torch modules kept at 8 bits ("lm_head",
    "model.layers.3.self_attn.v_proj": a measured layout, `unit_module` of the fp32 export's
    MatMuls); None keeps the fixed list."""
    _check_precision(precision, PRECISIONS)
    if keep_8bit_modules is not None and precision != INT4_CUDA:
        raise ValidationError(f"an 8-bit layout was given for {precision}: it is for int4-cuda here "
                              "(int4 takes it through quantize_onnx's keep_8bit)")
    model_dir = Path(model_dir).resolve()
    _check_source(model_dir)

    def build(staging: Path, say: LineSink) -> dict[str, Any] | None:
        if precision == INT4_CUDA:
            return _int4_cuda(model_dir, staging, say, keep_8bit_modules)
        return _build(model_dir, staging, precision, say)

    return _staged(Path(out_dir), precision, progress or _quiet, f"exporting {model_dir} to ONNX", build)


def quantize_onnx(fp32_dir: Path, out_dir: Path, precision: str,
                  progress: LineSink | None = None, keep_8bit: Collection[str] | None = None
                  ) -> dict[str, Any]:
    """Quantize an fp32 folder written by `export_onnx` to int4/int8 without exporting again.
    int4: `keep_8bit` names the weight MatMuls (`weight_units`) kept at 8 bits, a measured layout
    (`export.sensitivity`); None keeps the fixed list (the head, `INT4_KEEP_8BIT`)."""
    _check_precision(precision, QUANTIZED)
    fp32_dir = Path(fp32_dir).resolve()
    _check_fp32_export(fp32_dir)

    def build(staging: Path, say: LineSink) -> dict[str, Any]:
        details = _quantize(fp32_dir, staging, precision, say, keep_8bit)
        _copy_side_files(fp32_dir, staging, say)
        return details

    return _staged(Path(out_dir), precision, progress or _quiet, f"quantizing {fp32_dir}", build)


def _staged(out_dir: Path, precision: str, say: LineSink, what: str,
            build: Callable[[Path, LineSink], dict[str, Any] | None]) -> dict[str, Any]:
    """Run `build` into a hidden sibling of `out_dir`, check the graph runs, rename into place."""
    _check_target(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    started = time.monotonic()
    try:
        _make_staging(staging)
        details = build(staging, say)
        say("checking that the exported graph runs")
        _smoke_test(staging)
        info = describe(staging, precision, quantization=details)
        _publish(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ApplianceError) or not isinstance(exc, Exception):
            raise
        raise ApplianceError(f"{what} ({precision}) failed: {type(exc).__name__}: {exc}",
                             title=TITLE, hint=_hint_for(exc)) from exc
    info["seconds"] = round(time.monotonic() - started, 1)
    say(f"ONNX {precision} written to {out_dir} ({info['size_bytes'] / 2**20:.0f} MiB)")
    return info


def _check_precision(precision: str, valid: tuple[str, ...]) -> None:
    if precision not in valid:
        raise ValidationError(f"unknown ONNX precision {precision!r}",
                              hint="valid precisions: " + ", ".join(valid))


def _check_fp32_export(folder: Path) -> None:
    import onnx

    if not (folder / MODEL_FILE).is_file():
        raise ValidationError(f"{folder} holds no {MODEL_FILE}")
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    kv = [i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values.")]
    quantized = any(n.op_type in ("MatMulNBits", "MatMulInteger") for n in graph.node)
    if not kv or kv[0] != onnx.TensorProto.FLOAT or quantized:
        raise ValidationError(f"{folder} is not an fp32 ONNX export with a KV cache",
                              hint="quantize the fp32 folder that export_onnx wrote")


def _check_source(model_dir: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise ValidationError(f"{model_dir} has no {name}; ONNX export needs an HF model folder "
                                  "with a fast tokenizer")
    if "auto_map" in _read_json(model_dir / "config.json"):
        raise RefusedError(f"{model_dir / 'config.json'} declares custom code (auto_map); the "
                           "appliance never runs code that ships with a model")
    if not any(model_dir.glob("*.safetensors")):
        raise ValidationError(f"{model_dir} holds no *.safetensors weights")


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ApplianceError(f"{out_dir} already exists and is not an empty directory",
                             title="Already exists", hint="export into a new directory")


def _make_staging(staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)  # a killed export's leftovers
    staging.mkdir(parents=True)


def _hint_for(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "the export holds the whole model in memory (twice while quantizing); free memory"
    if isinstance(exc, OSError):
        return "check that the output directory's parent is a writable directory with free space"
    return "the model's architecture may not be supported by optimum's ONNX exporter"


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.is_dir():
        out_dir.rmdir()  # empty (checked): a writer's staging directory, say
    os.rename(staging, out_dir)


def _build(model_dir: Path, staging: Path, precision: str, say: LineSink) -> dict[str, Any] | None:
    if precision == "fp16" and _genai_build(model_dir, staging, say):
        _copy_side_files(model_dir, staging, say)
        return None
    raw = staging / "raw"
    dtype = "fp16" if precision == "fp16" else "fp32"
    say(f"exporting {model_dir.name} to an ONNX {dtype} graph (optimum, {TASK})")
    _optimum_export(model_dir, raw, dtype)
    details = None
    if precision in ("fp32", "fp16"):
        for name in (MODEL_FILE, DATA_FILE):
            if (raw / name).exists():
                os.rename(raw / name, staging / name)
    else:
        details = _quantize(raw, staging, precision, say)
    shutil.rmtree(raw)
    _copy_side_files(model_dir, staging, say)
    return details


def _int4_cuda(model_dir: Path, staging: Path, say: LineSink,
               keep_modules: Collection[str] | None) -> dict[str, Any]:
    """genai's fp16 graph (separate q/k/v), then int4 with the 8-bit layout mapped onto its MatMuls."""
    raw = staging / "raw"
    raw.mkdir()
    if not _genai_build(model_dir, raw, say, extra_options="disable_qkv_fusion=true",
                        fallback="refusing int4-cuda"):
        raise RefusedError(f"int4-cuda is built on onnxruntime-genai's fp16 graph, which cannot be made "
                           f"for {model_dir.name} here (see the line above)", title=TITLE,
                           hint="export int4 (the CPU's int4, which CUDA runs too, slower) or fp16")
    keep = None
    if keep_modules is not None:
        import onnx

        names = [n.name for n in _weight_matmuls(onnx.load(str(raw / MODEL_FILE), load_external_data=False))]
        keep, missing = genai_nodes(names, keep_modules)
        if missing:  # measured on modules this graph splits otherwise: the fixed layout is known good
            say(f"the measured int4 layout names {len(missing)} module(s) genai's graph has no MatMul for "
                f"(e.g. {missing[0]}): the fixed layout is used instead")
            keep = None
    details = _quantize(raw, staging, "int4", say, keep)
    if keep is not None:  # this graph's names (the layout file beside the export has the fp32 graph's)
        details["eight_bit_matmuls"] = keep
    os.rename(raw / GENAI_CONFIG, staging / GENAI_CONFIG)
    shutil.rmtree(raw)
    _copy_side_files(model_dir, staging, say)
    return {**details, "activations": "fp16", "qkv": "separate"}


def layer_key(module: str) -> tuple[int | None, str]:
    """(decoder layer, projection) of a module path, whatever the graph calls the blocks between:
    'model.layers.3.self_attn.v_proj' (optimum, torch) and 'model.layers.3.attn.v_proj' (genai)
    -> (3, 'v_proj'); 'lm_head' -> (None, 'lm_head')."""
    parts = module.split(".")
    layer = next((int(parts[i + 1]) for i, p in enumerate(parts[:-1])
                  if p == "layers" and parts[i + 1].isdigit()), None)
    return layer, parts[-1]


# HF modules that genai's builder splits into its own MatMuls (Phi-3's packed projections, Phi's
# attention output): a layout measured on the merged model names the HF module, the graph its parts
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
          "dense": ("o_proj",)}


def genai_nodes(names: Collection[str], modules: Collection[str]) -> tuple[list[str], list[str]]:
    """(the MatMuls of a genai graph, `names`, that compute the torch `modules`; the modules with no
    such MatMul). A packed module maps to each of its parts."""
    by_key = {layer_key(unit_module(n)): n for n in names}
    wanted, missing = set(), []
    for module in modules:
        layer, leaf = layer_key(module)
        keys = [(layer, part) for part in PACKED.get(leaf, (leaf,))]
        if all(k in by_key for k in keys):
            wanted.update(keys)
        else:
            missing.append(module)
    return [n for n in names if layer_key(unit_module(n)) in wanted], sorted(missing)


def _genai_build(model_dir: Path, staging: Path, say: LineSink, extra_options: str | None = None,
                 fallback: str = "exporting with optimum instead (slower on CUDA)") -> bool:
    """fp16 for CUDA through onnxruntime-genai's model builder, in a child process (it imports torch
    and transformers; offline variables set, a local folder only). False, with a line saying why,
    when genai is not installed or its builder does not know the architecture."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_genai") is None:
        say(f"onnxruntime-genai is not installed: {fallback}")
        return False
    say(f"building {model_dir.name} as an fp16 graph for CUDA (onnxruntime-genai's model builder)")
    cache = staging / ".builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(staging),
           "-p", "fp16", "-e", "cuda", "-c", str(cache),
           *(["--extra_options", extra_options] if extra_options else [])]
    code, tail = _run_builder(cmd, say)
    shutil.rmtree(cache, ignore_errors=True)
    if code == 0 and (staging / MODEL_FILE).is_file() and (staging / GENAI_CONFIG).is_file():
        for name in BUILDER_WRITES:  # the merged model's own files go beside the graph instead
            (staging / name).unlink(missing_ok=True)
        return True
    said = "\n".join(tail)
    for leftover in staging.iterdir():
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    if "not currently supported" in said or "is not supported" in said:
        say(f"onnxruntime-genai's builder does not know this architecture: {fallback}")
        return False
    raise ApplianceError(f"onnxruntime-genai's model builder failed on {model_dir} (exit {code}): "
                         + (tail[-1] if tail else "no output"), title=TITLE,
                         hint="its last lines are in the job log; the fp32/int4/int8 exports use optimum")


def _run_builder(cmd: list[str], say: LineSink) -> tuple[int, list[str]]:
    """Run the builder; 'Reading layer N' lines become progress lines, the rest is kept as the
    tail for an error. Anything raised meanwhile (a job's cancel) kills it."""
    import collections
    import subprocess

    from appliance.offline import OFFLINE_ENV

    tail: collections.deque[str] = collections.deque(maxlen=20)
    env = {**os.environ, **OFFLINE_ENV}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=env, text=True, errors="replace") as proc:
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                for line in (piece.strip() for piece in raw.split("\r")):
                    if line.startswith("Reading "):
                        say(f"  builder: {line[8:]}")
                    elif line and not line.startswith("Saving "):
                        tail.append(line)
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, list(tail)


def _copy_side_files(src: Path, staging: Path, say: LineSink) -> None:
    say("copying the tokenizer and config files")
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, staging / name)


@contextlib.contextmanager
def _quiet_logs(*names: str) -> Iterator[None]:
    """Mute the exporters' tracer warnings and info chatter; restore the loggers afterwards."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _optimum_export(model_dir: Path, raw: Path, dtype: str) -> None:
    from optimum.exporters.onnx import main_export

    with _quiet_logs("optimum", "transformers", "torch.onnx"):
        main_export(model_name_or_path=str(model_dir), output=raw, task=TASK, device="cpu",
                    dtype=dtype, framework="pt", library_name="transformers",
                    local_files_only=True, trust_remote_code=False, do_validation=False)
    if not (raw / MODEL_FILE).is_file():
        raise ApplianceError(f"optimum wrote no {MODEL_FILE} (found: "
                             f"{sorted(p.name for p in raw.iterdir())})", title=TITLE)


# -- quantization -----------------------------------------------------------------------------
def _quantize(raw: Path, staging: Path, precision: str, say: LineSink,
              keep_8bit: Collection[str] | None = None) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(raw / MODEL_FILE))  # external data too
    untied = _untie_lm_head(model)
    head = _head_node(model)
    layout: dict[str, Any] = {}
    if precision == "int4":
        keep, layout = _int4_layout(model, head, keep_8bit)
        say(f"quantizing weights to int4 (MatMulNBits, block 32, asymmetric; {layout['summary']} "
            "at 8 bits)")
        model = _nbits(model, bits=4, exclude=keep)
    else:
        say("quantizing weights to int8 (MatMulNBits, block 32, asymmetric)")
    model = _nbits(model, bits=8)  # int4: the MatMuls kept above
    save_model(model, staging / MODEL_FILE)
    head_bits = 8 if head is not None and _head_node(model) is None else None
    return {"method": "MatMulNBits", "weight_only": True, **NBITS, "bits": int(precision[3:]),
            "head_bits": head_bits, "lm_head_untied": untied, **layout}


def _int4_layout(model: Any, head: Any, keep_8bit: Collection[str] | None
                 ) -> tuple[list[str], dict[str, Any]]:
    """The MatMuls an int4 export keeps at 8 bits, and what the export's details say of them."""
    names = [n.name for n in _weight_matmuls(model)]
    if keep_8bit is None:
        keep, kind = fixed_8bit(names, head.name if head is not None else None), "fixed"
    else:
        unknown = sorted(set(keep_8bit) - set(names))
        if unknown:
            raise ApplianceError(f"the int4 layout names {len(unknown)} MatMul(s) the graph does not "
                                 f"have, e.g. {unknown[0]!r}", title=TITLE,
                                 hint="export again: the layout was measured on another graph")
        keep, kind = [n for n in names if n in keep_8bit], "measured"
    counts: dict[str, int] = {}
    for name in keep:
        part = unit_module(name).rsplit(".", 1)[-1]
        counts[part] = counts.get(part, 0) + 1
    summary = ", ".join(f"{part} x{c}" if c > 1 else part for part, c in sorted(counts.items()))
    return keep, {"layout": kind, "summary": summary or "nothing", "eight_bit": len(keep),
                  "weight_matmuls": len(names)}


def fixed_8bit(names: list[str], head: str | None) -> list[str]:
    """The fixed int4 layout (`--calibrate off`): the head and every `INT4_KEEP_8BIT` MatMul."""
    return [n for n in names if n == head or any(k in n for k in INT4_KEEP_8BIT)]


@dataclass(frozen=True)
class WeightUnit:
    """One MatMul with a constant weight: a unit that int4 or 8 bits can quantize."""

    name: str    # the node's name in the graph
    module: str  # the torch module it was exported from ("model.layers.3.mlp.down_proj", "lm_head")
    k: int       # input features (rows of B)
    n: int       # output features
    head: bool = False  # the logits MatMul


def weight_units(fp32_dir: Path) -> list[WeightUnit]:
    """The weight MatMuls of an fp32 export, as `quantize_onnx` sees them (a tied head untied)."""
    import onnx

    graph = onnx.load(str(Path(fp32_dir) / MODEL_FILE), load_external_data=False).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    tied = _tied_head(graph)
    if tied is not None:  # its B will be the embedding's transpose
        head, producer = tied
        shapes[head.input[1]] = list(reversed(shapes[producer.input[0]]))
    return [WeightUnit(n.name, unit_module(n.name), k=shapes[n.input[1]][0], n=shapes[n.input[1]][1],
                       head="logits" in n.output)
            for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes]


def unit_module(node_name: str) -> str:
    """optimum names a Linear's MatMul after the module path: '/model/layers.3/mlp/down_proj/MatMul'
    -> 'model.layers.3.mlp.down_proj'."""
    return node_name.strip("/").removesuffix("/MatMul").replace("/", ".")


def _weight_matmuls(model: Any) -> list[Any]:
    names = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in names]


def _tied_head(graph: Any) -> tuple[Any, Any] | None:
    """(the logits MatMul, the Transpose it reads its weight from) when the head is tied to a 2-D
    embedding as `MatMul(x, Transpose(embedding))`; else None."""
    head = next((n for n in graph.node if n.op_type == "MatMul" and "logits" in n.output), None)
    producer = {o: n for n in graph.node for o in n.output}.get(head.input[1]) if head else None
    if producer is None or producer.op_type != "Transpose":
        return None
    perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
    dims = next((list(t.dims) for t in graph.initializer if t.name == producer.input[0]), None)
    return (head, producer) if perm == [1, 0] and dims is not None and len(dims) == 2 else None


def _head_node(model: Any) -> Any:
    """The MatMul that computes the logits from a constant weight, if there is one."""
    names = {t.name for t in model.graph.initializer}
    return next((n for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output
                 and n.name and n.input[1] in names), None)


def _untie_lm_head(model: Any) -> bool:
    """Give the logits MatMul its own constant weight when it reads a transposed (tied) embedding,
    so that the quantizer, which only takes MatMuls with a constant B, quantizes the head too."""
    from onnx import numpy_helper

    graph = model.graph
    tied = _tied_head(graph)
    if tied is None:
        return False
    head, producer = tied
    weight = next(t for t in graph.initializer if t.name == producer.input[0])
    array = np.ascontiguousarray(numpy_helper.to_array(weight).T)
    graph.initializer.append(numpy_helper.from_array(array, name=f"{weight.name}.lm_head"))
    head.input[1] = f"{weight.name}.lm_head"
    if not any(producer.output[0] in n.input for n in graph.node):
        graph.node.remove(producer)
    return True


def _nbits_quantizer() -> Any:
    """Import MatMulNBitsQuantizer without keeping its side effect: the module calls
    `logging.basicConfig(level=INFO)` on import, which would turn on INFO logs process-wide."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise ApplianceError(f"weight quantization is unavailable: {exc}", title=TITLE,
                             hint="install onnx-ir (onnxruntime's MatMulNBits quantizer needs it)") from exc
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return MatMulNBitsQuantizer


def _nbits(model: Any, bits: int, exclude: Collection[str] | None = None) -> Any:
    """Weight-only blockwise quantization of every MatMul with a constant weight (not in `exclude`)."""
    quantizer = _nbits_quantizer()(model, bits=bits, nodes_to_exclude=list(exclude or []), **NBITS)
    with _quiet_logs("", "onnxruntime"):
        quantizer.process()
    return quantizer.model.model


def _weight_bytes(model: Any) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model(model: Any, path: Path) -> None:
    """Save inline when small, else with every weight in one external data file beside it."""
    import onnx

    if _weight_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path))
        return
    data = path.with_name(path.name + "_data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


# -- description and check --------------------------------------------------------------------
def describe(folder: Path, precision: str, quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an ONNX folder holds: files and sizes, opsets, IO and weight types."""
    import onnx

    graph_model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    inputs = {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)
              for i in graph_model.graph.input}
    return {
        "format": "onnx",
        "precision": precision,
        "task": TASK,
        "opset": {(o.domain or "ai.onnx"): o.version for o in graph_model.opset_import},
        "ir_version": graph_model.ir_version,
        "files": files,
        "size_bytes": sum(files.values()),
        "external_data": DATA_FILE in files or GENAI_DATA_FILE in files,
        "graph": "onnxruntime-genai builder" if GENAI_CONFIG in files else "optimum",
        "num_layers": sum(1 for n in inputs if n.endswith(".key")),
        "kv_dtype": next((t for n, t in inputs.items() if n.startswith("past_key_values.")), None),
        "inputs": sorted(n for n in inputs if not n.startswith("past_key_values.")),
        "quantization": quantization,
    }


def _smoke_test(folder: Path) -> None:
    logits = OnnxLM(folder, threads=1).logits([1, 2, 3])
    if logits.shape[0] != 3 or not np.isfinite(logits).all():
        raise ApplianceError(f"the exported graph in {folder} gives non-finite or misshaped logits "
                             f"(shape {logits.shape})", title=TITLE)


# -- run --------------------------------------------------------------------------------------
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass
class KVCache:
    """The past keys/values fed to the next step, by graph input name, and how many positions.
    A tensor is a numpy array, or an onnxruntime OrtValue on the device (IO binding)."""

    tensors: dict[str, Any]
    length: int

    def cut(self, keep: int) -> KVCache:
        """The first `keep` positions (a device tensor is copied to the host first: rare, when a
        conversation is edited; the next step puts it back on the device)."""
        def host(v: Any) -> np.ndarray:
            return v if isinstance(v, np.ndarray) else v.numpy()

        return KVCache({k: host(v)[:, :, :keep] for k, v in self.tensors.items()}, keep)


class OnnxLM:
    """One exported decoder (batch 1) on onnxruntime: no torch, transformers or optimum needed."""

    def __init__(self, folder: Path, threads: int | None = None,
                 providers: list[str] | None = None, bind: bool | None = None) -> None:
        """bind: keep the cache on the execution provider's device between steps (IO binding);
        None: on CUDA only (on the CPU the plain feed has no copy to save)."""
        import onnxruntime as ort

        self.folder = Path(folder)
        self.providers = _check_providers(providers or ["CPUExecutionProvider"])
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.bind = self.device == "cuda" if bind is None else bind
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), options,
                                            providers=self.providers)
        _check_started(self.session, self.providers, self.folder)
        self._read_io()
        self._tokenizer: Any = None

    def _read_io(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.past_dtype = NUMPY_TYPES[inputs[self.past_names[0]].type] if self.past_names else np.float32
        self.id_dtype = NUMPY_TYPES[inputs["input_ids"].type]
        self._empty = {n: np.zeros(self._empty_shape(inputs[n].shape), self.past_dtype)
                       for n in self.past_names}
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_names = ["logits"] + [o for o in outputs if o.startswith("present.")]
        self._past_for = {o: o.replace("present.", "past_key_values.", 1) for o in self.output_names[1:]}

    def _empty_shape(self, shape: list[Any]) -> tuple[int, ...]:
        """[batch, kv_heads, past_len, head_dim] with batch 1 and no past positions."""
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            heads, head_dim = self._kv_shape_from_config()
            return (1, heads, 0, head_dim)
        return (1, shape[1], 0, shape[3])

    def _kv_shape_from_config(self) -> tuple[int, int]:
        config = self.config
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return int(heads), int(head_dim)

    @property
    def config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        return _read_json(path) if path.exists() else {}

    def empty_cache(self) -> KVCache:
        return KVCache(dict(self._empty), 0)

    def forward(self, ids: list[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """Run `ids` after `cache`: float32 logits [len(ids), vocab] and the extended cache."""
        if not ids:
            raise ValidationError("no token ids to run")
        total = cache.length + len(ids)
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=self.id_dtype)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(cache.length, total, dtype=np.int64)[None, :]
        if self.bind:
            logits, presents = self._run_bound(feeds, cache)
        else:
            feeds.update(cache.tensors)
            logits, *presents = self.session.run(self.output_names, feeds)
        past = {self._past_for[n]: t for n, t in zip(self.output_names[1:], presents, strict=True)}
        return logits[0].astype(np.float32, copy=False), KVCache(past, total)

    def _run_bound(self, feeds: dict[str, np.ndarray], cache: KVCache) -> tuple[np.ndarray, list[Any]]:
        """One step through IO binding: the ids and the mask from the host, the past from where the
        last step left it (the device), the presents kept on the device, only the logits copied
        back to the host."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in cache.tensors.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device, 0)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return logits.numpy(), presents

    def logits(self, ids: list[int]) -> np.ndarray:
        """Score a whole sequence in one pass: float32 [len(ids), vocab]."""
        return self.forward(ids, self.empty_cache())[0]

    def prefill(self, ids: list[int], chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, KVCache]:
        """Run the prompt: the last position's logits [vocab] and the cache after it. Runs `chunk`
        tokens at a time: the graph computes logits for every position it is given (vocab floats
        each), so chunks bound that memory for long prompts."""
        if not ids:
            raise ValidationError("no token ids to run")
        cache = self.empty_cache()
        for start in range(0, len(ids), chunk):
            logits, cache = self.forward(ids[start:start + chunk], cache)
        return logits[-1], cache

    def decode(self, token: int, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One step: feed `token` after `cache`; its logits [vocab] and the longer cache."""
        logits, cache = self.forward([token], cache)
        return logits[-1], cache

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """Greedy continuation of `ids`, without the stop token; at most `max_new_tokens`."""
        stops = set(stop_ids)
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits, cache = self.prefill(ids)
        while True:
            token = int(np.argmax(logits))
            if token in stops:
                break
            out.append(token)
            if len(out) >= max_new_tokens:
                break
            logits, cache = self.decode(token, cache)
        return out

    @property
    def stop_ids(self) -> list[int]:
        """EOS ids from generation_config.json (else config.json)."""
        for name in ("generation_config.json", "config.json"):
            path = self.folder / name
            value = _read_json(path).get("eos_token_id") if path.exists() else None
            if value is not None:
                return [int(v) for v in (value if isinstance(value, list) else [value])]
        return []

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        return self._tokenizer

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, adding no special tokens (chat templates write them explicitly)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _check_providers(providers: list[str]) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ApplianceError(f"onnxruntime has no {', '.join(missing)} here",
                             title="Execution provider unavailable",
                             hint="available: " + ", ".join(available) + "; " + CUDA_HINT)
    if "CUDAExecutionProvider" in providers:
        _preload_cuda_libraries(ort)
    if "CPUExecutionProvider" not in providers:
        providers = [*providers, "CPUExecutionProvider"]  # for the ops a GPU provider lacks
    return providers


def _preload_cuda_libraries(ort: Any) -> None:
    """Load the CUDA runtime, cuBLAS and cuDNN from the nvidia-* wheels set-up installed beside
    onnxruntime-gpu (its CUDA provider does not look there by itself unless torch loaded them first:
    the engine never imports torch). What it prints goes to the log, not the console."""
    import io

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            preload()
        except OSError as exc:  # a library it found but could not load: the session check says why
            print(exc)
    if printed.getvalue().strip():
        logging.getLogger(__name__).info("onnxruntime.preload_dlls: %s", printed.getvalue().strip())


def _check_started(session: Any, providers: list[str], folder: Path) -> None:
    """onnxruntime falls back to the CPU, with only a log line, when the CUDA provider cannot start
    (a missing libcudnn, libcublas or driver): refuse instead of serving on the CPU under a GPU label."""
    started = session.get_providers()
    if providers[0] != "CPUExecutionProvider" and (not started or started[0] != providers[0]):
        raise ApplianceError(f"onnxruntime could not start {providers[0]} for {folder} (it runs on "
                             f"{', '.join(started) or 'nothing'})", title="GPU unavailable", hint=CUDA_HINT)
