"""ONNX on a CUDA GPU (onnxruntime-gpu's CUDA provider): decode speed and time to first token of the
appliance's ONNX engine, fp16 and int4, each as a share of the card's memory-bandwidth limit; and
the fp16 export of the real SmolLM2 that tests/gpu/test_onnx_gpu.py runs.

    python3 bench/onnx_gpu.py smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol-onnx
    python3 bench/onnx_gpu.py smollm2 --gguf ... --out /tmp/smol-int4 --precision int4-cuda
    python3 bench/onnx_gpu.py prepare --shapes 8b --precisions int4-cuda,fp16   # exports only, no GPU
    python3 bench/onnx_gpu.py bench --shapes 0.5b --precisions fp16,int4 --out results.json

`smollm2`: the embedded GGUF dequantized by transformers into an HF folder (tokenizer and chat
template from the GGUF's metadata), then `export.onnx.export_onnx(..., "fp16")`, the product's
exporter (a GPU host has no workspace with a run to export; this is the same function the export
stage calls).

`bench`: for each shape (random weights, bench/gguf_gpu.py's HF folders) the product's exports
(fp16: genai's builder graph; int4: MatMulNBits from the fp32 export, as the export stage does;
int4-cuda: genai's fp16 graph in int4 with the fixed 8-bit layout), then in a child process that
never imports torch (one CUDA runtime per process), the product's `OnnxEngine` on CUDA, greedy, stop
tokens biased away, N tokens after a short chat prompt, median of 3 after a warm-up: decode tokens/s
(first token to last) and time to first token; with IO binding (the cache kept on the device: the
engine's default on CUDA) and without (the host feed), so the binding's worth is measured, not
assumed. The bandwidth limit: the graph's initializer bytes but the token embedding (one row of it
is read per token) over the card's measured device-to-device copy bandwidth; efficiency = tokens/s x
bytes / bandwidth.

`--variants` adds fp16 rows beside the product's export, so the choice the issue asks for (the
product's graph with its cache bound on the device, or onnxruntime-genai's CUDA runtime) is measured,
not argued: `fused` is the product's fp16 export passed through onnxruntime's transformer optimizer
(model type qwen3: a decoder with RoPE, GQA and RMSNorm; fewer, fused nodes, the same inputs and
outputs, so the product's engine runs it unchanged); `genai` is onnxruntime-genai's model builder run
on the same HF folder (its own graph: GroupQueryAttention, a cache buffer shared between past and
present) and decoded by its generator; `genai-graph` the same with CUDA graphs. `--profile` runs the
product's fp16 export under onnxruntime's profiler for a few tokens and reports, per decode step,
the wall time, the summed node (launch) time, the node count per provider and the ops by time.

Prints JSON lines and a Markdown table; writes --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def smollm2(gguf: Path, out: Path, work: Path, graph: str = "genai", precision: str = "fp16") -> None:
    """The real SmolLM2 as an fp16 (or int4-cuda) ONNX, from its GGUF (no llama.cpp needed:
    transformers reads GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.onnx import export_onnx

    hf = work / "smollm2-hf"
    if not (hf / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(str(hf))
        tokenizer.save_pretrained(str(hf))
    with _graph(graph):
        info = export_onnx(hf, out, precision, progress=print)
    print(json.dumps({"onnx": str(out), "size_mib": round(info["size_bytes"] / 2**20, 1)}))


@contextlib.contextmanager
def _graph(graph: str) -> Iterator[None]:
    """fp16 as the export stage builds it (genai's builder), or as it did before (optimum)."""
    import export.onnx

    builder = export.onnx._genai_build
    if graph == "optimum":
        export.onnx._genai_build = lambda *args: False  # type: ignore[assignment]
    try:
        yield
    finally:
        export.onnx._genai_build = builder


def make_exports(shape: str, work: Path, precisions: list[str]) -> dict[str, Path]:
    from bench.gguf_gpu import random_model
    from export.onnx import export_onnx, quantize_onnx

    hf = work / f"{shape}-hf"
    if not (hf / "config.json").is_file():
        random_model(shape, hf)
        _index(hf)
    out: dict[str, Path] = {}
    for precision in precisions:
        folder = work / f"{shape}-{precision}"
        if not (folder / "model.onnx").is_file():
            if precision in ("int4", "int8"):
                fp32 = work / f"{shape}-fp32"
                if not (fp32 / "model.onnx").is_file():
                    export_onnx(hf, fp32, "fp32", progress=print)
                quantize_onnx(fp32, folder, precision, progress=print)
            else:
                export_onnx(hf, folder, precision, progress=print)
        out[precision] = folder
    return out


def _index(hf: Path) -> None:
    """random_model's shards (model-0000N.safetensors, which llama.cpp's converter reads as they
    are) get the index transformers needs."""
    from safetensors import safe_open

    weight_map = {}
    for shard in sorted(hf.glob("model-*.safetensors")):
        with safe_open(str(shard), "np") as f:
            weight_map |= {name: shard.name for name in f.keys()}  # noqa: SIM118
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def weight_bytes(folder: Path) -> int:
    """Bytes a decode step reads: every initializer but the token embedding (a Gather of one row)
    and a fused RotaryEmbedding's cos/sin caches (one position's row each)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    gathered |= {name for n in model.graph.node if n.op_type == "RotaryEmbedding" for name in n.input[2:4]}
    total = 0
    for t in model.graph.initializer:
        if t.name in gathered:
            continue
        size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        n = 1
        for d in t.dims:
            n *= d
        total += n * size
    return total


def ours(folder: Path, tokens: int, bind: bool) -> tuple[float, float, str]:
    """The product's ONNX engine on CUDA: (decode tokens/s, time to first token s), medians."""
    from appliance.runtime.engine import Artifact
    from appliance.runtime.onnx_engine import OnnxEngine
    from bench.gguf_gpu import decode_timing

    engine = OnnxEngine(Artifact(folder.name, "onnx", folder, "unknown"), gpu=True, context_length=2048)
    engine.lm.bind = bind
    try:
        rate, first = decode_timing(engine, tokens)
    finally:
        engine.close()
    return rate, first, type(engine.lm).__name__


def side_files(src: Path, dst: Path) -> None:
    """Everything of an export folder but its graph and weights (tokenizer, configs, template)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy(f, dst / f.name)


def fuse(fp32: Path, out: Path) -> Path:
    """The product's fp32 export through onnxruntime's transformer optimizer, its python fusions only
    (opt_level 0: no session pass, which could leave provider-specific ops in the file), then to
    fp16 (inputs and outputs too, as the product's fp16 export has them): fusing the fp16 export
    itself leaves RotaryEmbedding with an fp32 cos/sin cache beside fp16 activations."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    if (out / "model.onnx").is_file():
        return out
    cfg = json.loads((fp32 / "config.json").read_text())
    model = optimize_model(str(fp32 / "model.onnx"), model_type="qwen3",
                           num_heads=cfg["num_attention_heads"], hidden_size=cfg["hidden_size"], opt_level=0)
    model.convert_float_to_float16(keep_io_types=False)
    side_files(fp32, out)
    model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    before = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    after = onnx.load(str(out / "model.onnx"), load_external_data=False)
    print(json.dumps({"fused_nodes": {"before": len(before.graph.node), "after": len(after.graph.node)},
                      "fused_ops": dict(collections.Counter(n.op_type for n in after.graph.node)
                                        .most_common(12))}), flush=True)
    return out


def genai_build(hf: Path, out: Path, precision: str, cuda_graph: bool) -> Path:
    """onnxruntime-genai's builder on the same HF folder (local input; its cache dir in work)."""
    if (out / "genai_config.json").is_file():
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cuda", "-c", str(out.parent / "genai-cache")]
    if cuda_graph:
        cmd += ["--extra_options", "enable_cuda_graph=1"]
    env = dict(os.environ)
    if os.environ.get("GENAI_BUILDER_PYTHONPATH"):  # its builder wants a newer transformers than ours
        env["PYTHONPATH"] = os.environ["GENAI_BUILDER_PYTHONPATH"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"genai builder failed: {done.stderr[-1500:]}")
    return out


def genai_rate(folder: Path, tokens: int) -> tuple[float, float]:
    """onnxruntime-genai's generator, greedy, `tokens` new tokens forced (min_length): (decode
    tokens/s, time to first token s), medians of 3 after a warm-up."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = tokenizer.encode("<|im_start|>user\nWrite a long story.<|im_end|>\n<|im_start|>assistant\n")
    rates, firsts = [], []
    for _ in range(4):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + tokens, min_length=len(ids) + tokens)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            stamps.append(time.perf_counter())
        del generator
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        firsts.append(stamps[0] - start)
    return statistics.median(rates[1:]), statistics.median(firsts[1:])


def profile(folder: Path, tokens: int) -> dict[str, object]:
    """The product's engine on CUDA under onnxruntime's profiler: per decode step (runs after the
    prefill), wall ms, summed node ms (for CUDA nodes, the host's launch time), nodes per provider,
    and the ten op types that take the most node time."""
    import tempfile

    import onnxruntime as ort

    from appliance.runtime.engine import Artifact, Sampling
    from appliance.runtime.onnx_engine import OnnxEngine

    prefix = tempfile.mkdtemp() + "/ort"
    plain = ort.SessionOptions

    def profiled() -> object:
        options = plain()
        options.enable_profiling = True
        options.profile_file_prefix = prefix
        return options

    ort.SessionOptions = profiled  # type: ignore[misc]
    engine = OnnxEngine(Artifact(folder.name, "onnx", folder, "unknown"), gpu=True, context_length=2048)
    bias = tuple((int(t), -100.0) for t in engine.stop_ids)
    for _ in engine.generate([{"role": "user", "content": "Write a long story."}],
                             Sampling(temperature=0.0, max_tokens=tokens, logit_bias=bias)):
        pass
    events = json.loads(Path(engine.lm.session.end_profiling()).read_text())
    engine.close()
    runs = [e for e in events if e.get("name") == "model_run"]
    decode = runs[2:]  # skip the warm-up's first run and the prefill
    lo, hi = decode[0]["ts"], decode[-1]["ts"] + decode[-1]["dur"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and lo <= e["ts"] <= hi]
    by_op: collections.Counter[str] = collections.Counter()
    by_provider: collections.Counter[str] = collections.Counter()
    for e in nodes:
        by_op[e["args"].get("op_name", "?")] += e["dur"]
        by_provider[e["args"].get("provider", "?")] += 1
    steps = len(decode)
    wall = statistics.median(r["dur"] for r in decode)
    return {"decode_steps": steps, "wall_ms_per_step": round(wall / 1000, 2),
            "node_ms_per_step": round(sum(e["dur"] for e in nodes) / steps / 1000, 2),
            "nodes_per_step": {k: round(v / steps) for k, v in by_provider.items()},
            "top_ops_ms_per_step": {k: round(v / steps / 1000, 3) for k, v in by_op.most_common(10)}}


def in_child(call: str) -> Any:
    """`call` (an expression over this module) in a fresh process: one CUDA runtime, no torch."""
    from bench.gguf_gpu import in_child as run

    return run("bench.onnx_gpu", call)


def ours_in_child(folder: Path, tokens: int, bind: bool) -> tuple[float, float, str]:
    rate, ttft, backend = in_child(f"ours(Path({str(folder)!r}), {tokens}, {bind})")
    return float(rate), float(ttft), str(backend)


def bench(args: argparse.Namespace) -> None:
    import torch

    from bench.gguf_gpu import bandwidth_gbs

    gbs = bandwidth_gbs()
    import onnxruntime as ort

    info: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "bandwidth_gbs": round(gbs, 1),
                               "torch": torch.__version__, "onnxruntime": ort.__version__,
                               "providers": ort.get_available_providers()}
    try:
        import onnxruntime_genai as og
        info["onnxruntime_genai"] = og.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    variants = [v for v in args.variants.split(",") if v]
    rows: list[dict[str, object]] = []
    for shape in args.shapes.split(","):
        args.work.mkdir(parents=True, exist_ok=True)
        exports = make_exports(shape, args.work, args.precisions.split(","))
        for precision, folder in exports.items():
            rows.append(product_row(shape, precision, folder, gbs, args.tokens))
        if "fp16" in exports and args.profile:
            call = f"profile(Path({str(exports['fp16'])!r}), 32)"
            info[f"profile_{shape}_fp16"] = _guarded(lambda: in_child(call))  # noqa: B023
            print(json.dumps({"profile": info[f"profile_{shape}_fp16"]}), flush=True)
        for variant in variants:
            rows.append(variant_row(shape, variant, args.work, exports.get("fp16"), gbs, args.tokens))
    columns = ["shape", "precision", "gib", "bound_tps", "bound_ttft_ms", "bound_pct_of_limit",
               "host_feed_tps", "host_feed_ttft_ms", "host_feed_pct_of_limit"]
    table = ["| shape | engine / precision | GiB read/token | tok/s (IO binding) | TTFT ms | % of limit | "
             "tok/s (host feed) | TTFT ms | % of limit |", "|" + " --- |" * len(columns)]
    table += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    print("\n".join(table))
    if args.out:
        args.out.write_text(json.dumps({**info, "rows": rows}, indent=2))


def _guarded(call: Callable[[], object]) -> object:
    try:
        return call()
    except RuntimeError as exc:
        return {"error": str(exc)[-600:]}


def _rates(row: dict[str, object], key: str, rate: float, ttft: float, size: int, gbs: float) -> None:
    row |= {f"{key}_tps": round(rate, 1), f"{key}_ttft_ms": round(ttft * 1000, 1),
            f"{key}_pct_of_limit": round(100 * rate * size / (gbs * 1e9), 1)}


def product_row(shape: str, precision: str, folder: Path, gbs: float, tokens: int) -> dict[str, object]:
    """The product's engine on an export, with IO binding and with the host feed."""
    size = weight_bytes(folder)
    row: dict[str, object] = {"shape": shape, "precision": precision, "gib": round(size / 2**30, 3),
                              "limit_tps": round(gbs * 1e9 / size, 1)}
    for bind in (True, False):
        key = "bound" if bind else "host_feed"
        try:
            rate, ttft, backend = ours_in_child(folder, tokens, bind)
        except RuntimeError as exc:
            row[f"{key}_error"] = str(exc)[-600:]
            continue
        row["backend"] = backend
        _rates(row, key, rate, ttft, size, gbs)
        if backend == "GenaiLM":
            break  # genai's generator keeps its own buffer on the device: no host-feed variant
    print(json.dumps(row), flush=True)
    return row


def variant_row(shape: str, variant: str, work: Path, fp16: Path | None, gbs: float,
                tokens: int) -> dict[str, object]:
    """An fp16 row beside the product's: its graph fused (the product's engine), or genai's."""
    row: dict[str, object] = {"shape": shape, "precision": f"{variant} fp16"}
    try:
        if variant == "fused":
            if not (work / f"{shape}-fp32" / "model.onnx").is_file():
                raise RuntimeError("fused needs the fp32 export (--precisions with int4 or fp32)")
            folder = fuse(work / f"{shape}-fp32", work / f"{shape}-fp16-fused")
            size = weight_bytes(folder)
            for bind in (True, False):
                rate, ttft, _ = ours_in_child(folder, tokens, bind)
                _rates(row, "bound" if bind else "host_feed", rate, ttft, size, gbs)
        elif variant == "optimum":
            from export.onnx import export_onnx

            folder = work / f"{shape}-fp16-optimum"
            if not (folder / "model.onnx").is_file():
                with _graph("optimum"):
                    export_onnx(work / f"{shape}-hf", folder, "fp16", progress=print)
            return product_row(shape, "fp16 (optimum's graph, before)", folder, gbs, tokens)
        elif variant in ("genai", "genai-graph"):
            folder = genai_build(work / f"{shape}-hf", work / f"{shape}-{variant}-fp16", "fp16",
                                 variant == "genai-graph")
            size = weight_bytes(folder)
            rate, ttft = in_child(f"genai_rate(Path({str(folder)!r}), {tokens})")
            _rates(row, "bound", rate, ttft, size, gbs)  # genai keeps its cache on the device
        else:
            raise RuntimeError(f"unknown variant {variant}")
        row |= {"gib": round(size / 2**30, 3), "limit_tps": round(gbs * 1e9 / size, 1)}
    except (RuntimeError, ImportError, OSError) as exc:
        row["error"] = str(exc)[-800:]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("smollm2")
    s.add_argument("--gguf", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--work", type=Path, default=Path("/tmp/onnx-gpu"))
    s.add_argument("--graph", choices=("genai", "optimum"), default="genai")
    s.add_argument("--precision", choices=("fp16", "int4-cuda"), default="fp16")
    p = sub.add_parser("prepare", help="only the exports `bench` would make (no GPU needed)")
    p.add_argument("--shapes", default="0.5b")
    p.add_argument("--precisions", default="fp16,int4,int4-cuda")
    p.add_argument("--work", type=Path, default=Path("/tmp/onnx-gpu"))
    b = sub.add_parser("bench")
    b.add_argument("--shapes", default="0.5b")
    b.add_argument("--precisions", default="fp16,int4,int4-cuda")
    b.add_argument("--tokens", type=int, default=128)
    b.add_argument("--variants", default="",
                   help="comma list of fp16 rows: optimum, fused, genai, genai-graph")
    b.add_argument("--profile", action="store_true", help="profile the product's fp16 decode step")
    b.add_argument("--work", type=Path, default=Path("/tmp/onnx-gpu"))
    b.add_argument("--out", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.command == "smollm2":
        args.work.mkdir(parents=True, exist_ok=True)
        smollm2(args.gguf, args.out, args.work, args.graph, args.precision)
    elif args.command == "prepare":
        args.work.mkdir(parents=True, exist_ok=True)
        for shape in args.shapes.split(","):
            print(json.dumps({shape: {k: str(v) for k, v in
                                      make_exports(shape, args.work, args.precisions.split(",")).items()}}),
                  flush=True)
    else:
        bench(args)


if __name__ == "__main__":
    main()
