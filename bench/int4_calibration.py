"""Issue 18, calibrated int4 ONNX: onnxruntime's weight-only quantizers and a measured mixed-precision
layout on a run's fp32 ONNX graph, each scored as `appliance verify` scores an int4 export, with its
CPU decode speed measured side by side against today's int4.

    PYTHONPATH=. python bench/int4_calibration.py --home WS --run demo-qlora --out /tmp/int4-bench \\
        [--variants today,today-acc0,...] [--sens-convs 4] [--sens-tokens 256] [--gptq-convs 4]

The run needs its merged model (`appliance merge RUN`); the fp32 ONNX graph is taken from the run's
`<run>-onnx-fp32` export if there is one, else exported into --out. Data:
- scoring: the parity gate's own sample (`scoring.parity_data`: the first 16 held-out conversations,
  up to 512 tokens), against the merged model in fp32 through transformers (`scoring.HFScorer`), with
  `parity.score`/`parity.judge`, so Δppl, KL and agreement mean what `appliance verify` prints;
- calibration (sensitivity scan, GPTQ): the run's training conversations, in order, rendered with
  the model's chat template (`appliance.chat.render_and_mask`, as training rendered them); never the
  held-out split. Their sha256 (`importance.conversation_hash`) are printed.

Sensitivity: every MatMul with a constant weight (7 per layer and the head) is one unit. From the
graph with every unit at 8 bits, one unit at a time is put at 4 bits and the mean KL to the fp32
graph on the calibration conversations' assistant tokens is measured; its increase over the
all-8-bit graph is the unit's sensitivity. `sens-*` layouts keep at 8 bits the units with the most
sensitivity per byte saved until the 8-bit bytes reach a budget (`--budget-mib`, default: today's
layout's bytes, so the same size).

`measured*` rows: the product's layout (`export onnx --calibrate auto`, appliance.stages.export.layout:
a Fisher estimate of each unit's KL increase from backward passes on the run's training
conversations, the fixed layout's bytes), with the seed of its label draws (the product uses 0).

Decode: greedy, `--decode-tokens` new tokens (no stop) after a short chat prompt, 2 threads
(the runtime's default on this box), tok/s of the decode steps, median of `--rounds` rounds; each
round measures every variant in turn (interleaved), so load from the rest of the box hits them alike.

Prints a markdown table (variant, layout, size, Δppl, KL, agreement, decode tok/s) and writes it,
with the sensitivity scan and the calibration hashes, to --out/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Give me three tips for writing a clear email."}]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TODAY_KEEP = ("down_proj", "v_proj")  # export.onnx.INT4_KEEP_8BIT, today's fixed list


# -- inputs -------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    merged: Path
    fp32: Path
    held_out: list[Any]            # parity.Sample
    calib: list[Any]               # parity.Sample (training split)
    calib_hashes: list[str]
    dataset: str


def load_inputs(home: Path, run: str, out: Path, n_calib: int, calib_tokens: int) -> Inputs:
    from appliance import manifest
    from appliance.hfmodel import load_tokenizer
    from appliance.stages.datasets import importer as datasets
    from appliance.stages.export import importance
    from appliance.stages.merge.inputs import merged_name, run_inputs
    from appliance.stages.verify import parity
    from appliance.stages.verify.scoring import parity_data
    from appliance.workspace import Workspace

    ws = Workspace(home)
    merged = ws.get("export", merged_name(run))
    _, model, dataset = run_inputs(ws, run, hash_model=False)
    tokenizer = load_tokenizer(merged.path)
    held_out, _ = parity_data(model, dataset, tokenizer)
    rows = datasets.load_rows(dataset, "train")
    stops = manifest.read(model.path)["info"]["stop_tokens"]
    calib: list[Any] = []
    hashes: list[str] = []
    for row in rows:
        if len(calib) >= n_calib:
            break
        got = parity.samples(tokenizer, [row["messages"]], stops, calib_tokens)
        if got:
            calib += got
            hashes.append(importance.conversation_hash(row["messages"]))
    try:
        fp32 = ws.get("export", f"{run}-onnx-fp32").path / "onnx"
    except Exception:
        fp32 = out / "fp32"
        if not (fp32 / "model.onnx").is_file():
            from export.onnx import export_onnx
            export_onnx(merged.path, fp32, "fp32", progress=print)
    return Inputs(merged.path, fp32, held_out, calib, hashes, dataset.name)


def reference_rows(inputs: Inputs, cache: Path) -> list[np.ndarray]:
    """The merged model's logits at the held-out positions (transformers, fp32), cached."""
    from appliance.stages.verify import parity
    from appliance.stages.verify.scoring import HFScorer

    if cache.is_file():
        with np.load(cache) as z:
            return [z[f"r{i}"] for i in range(len(z.files))]
    rows = parity.reference_rows(HFScorer(inputs.merged), inputs.held_out)
    np.savez(cache, **{f"r{i}": r for i, r in enumerate(rows)})
    return rows


# -- quantizing ---------------------------------------------------------------------------------------
def _quantizer() -> Any:
    from export.onnx import _nbits_quantizer

    return _nbits_quantizer()


def load_fp32(folder: Path) -> tuple[Any, list[str], str]:
    """The fp32 graph with its head untied (as export.onnx does), its weight MatMuls and the head's name."""
    import onnx

    from export.onnx import _head_node, _untie_lm_head

    model = onnx.load(str(folder / "model.onnx"))
    _untie_lm_head(model)
    inits = {t.name for t in model.graph.initializer}
    names = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    return model, names, _head_node(model).name


def quantize(model: Any, bits: int, exclude: list[str], *, algo: str = "default", block: int = 32,
             sym: bool = False, acc: int = 4, calib: Callable[[], Any] | None = None) -> Any:
    """MatMulNBitsQuantizer on a copy of `model`: the MatMuls not in `exclude` at `bits`."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    config = None
    if algo == "hqq":
        config = mq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    elif algo == "rtn":
        config = mq.RTNWeightOnlyQuantConfig()
    elif algo == "kquant":
        config = mq.KQuantWeightOnlyQuantConfig()
    elif algo == "gptq":
        config = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calib())
    quantizer = _quantizer()(copy.deepcopy(model), bits=bits, block_size=block, is_symmetric=sym,
                             accuracy_level=acc, nodes_to_exclude=list(exclude), algo_config=config)
    if algo == "gptq":  # its path ignores nodes_to_exclude (onnxruntime 1.31): mark them as the RTN path does
        configs = quantizer._generate_q4_node_config
        quantizer._generate_q4_node_config = lambda: {**configs(), **{n: "fp32" for n in exclude}}
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger("neural_compressor").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # the RTN/k-quant/GPTQ path prints a progress bar
        quantizer.process()
    out = quantizer.model
    return out.model if hasattr(out, "model") else out


def mixed(model: Any, names: list[str], four: set[str], **kw: Any) -> Any:
    """The units in `four` at 4 bits (with `kw`), every other weight MatMul at 8 bits (block 32,
    asymmetric, accuracy level `kw['acc']` as today's second pass)."""
    q4 = quantize(model, 4, [n for n in names if n not in four], **kw) if four else copy.deepcopy(model)
    return quantize(q4, 8, [], block=32, acc=kw.get("acc", 4))


def with_acc(model: Any, acc: int) -> Any:
    """`accuracy_level` set on every MatMulNBits node that has none (HQQ's quantizer writes none)."""
    from onnx import helper

    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in n.attribute):
            n.attribute.append(helper.make_attribute("accuracy_level", acc))
    return model


def layout(names: list[str], head: str, keep: Callable[[str], bool]) -> set[str]:
    """The 4-bit set: every weight MatMul except the head and those `keep` says stay at 8 bits."""
    return {n for n in names if n != head and not keep(n)}


def bits_per_unit(model: Any) -> dict[str, int]:
    """MatMulNBits node name -> bits."""
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            out[n.name] = next(a.i for a in n.attribute if a.name == "bits")
    return out


def describe_layout(model: Any) -> str:
    counts: dict[tuple[str, int], int] = {}
    for name, b in bits_per_unit(model).items():
        kind = next((p for p in PROJ if p in name), "head")
        counts[(kind, b)] = counts.get((kind, b), 0) + 1
    eights = [f"{k}x{c}" for (k, b), c in sorted(counts.items()) if b == 8]
    return "8-bit: " + (", ".join(eights) if eights else "none")


def save(model: Any, fp32: Path, folder: Path) -> int:
    from export.onnx import SIDE_FILES, save_model

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_model(model, folder / "model.onnx")
    for name in SIDE_FILES:
        if (fp32 / name).is_file():
            shutil.copyfile(fp32 / name, folder / name)
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


# -- measuring ----------------------------------------------------------------------------------------
def logits_rows(lm: Any, data: list[Any]) -> list[np.ndarray]:
    return [lm.logits(s.input_ids)[s.positions] for s in data]


def kl_to(rows_ref: list[np.ndarray], lm: Any, data: list[Any]) -> float:
    from appliance.stages.verify import parity

    score = parity.Score()
    for s, ref in zip(data, rows_ref, strict=True):
        score.add(ref, lm.logits(s.input_ids)[s.positions], s.targets)
    return score.kl / max(score.count, 1)


def parity_of(folder: Path, inputs: Inputs, ref_rows: list[np.ndarray]) -> dict[str, Any]:
    from appliance.stages.verify import parity
    from export.onnx import OnnxLM

    ref = parity.Score()
    for s, r in zip(inputs.held_out, ref_rows, strict=True):
        ref.add(r, r, s.targets)
    lm = OnnxLM(folder, threads=2)
    got = parity.score(lm, inputs.held_out, ref_rows)
    return parity.judge(folder.name, "int4", got, ref, None).__dict__


def decode_speed(folder: Path, tokens: int) -> float:
    """tok/s of `tokens` greedy decode steps after the prompt's prefill (one warm-up step first)."""
    from appliance import chat
    from appliance.hfmodel import load_tokenizer
    from export.onnx import OnnxLM

    lm = OnnxLM(folder, threads=2)
    ids = lm.tokenize(chat.render(load_tokenizer(folder), PROMPT, generation_prompt=True))
    logits, cache = lm.prefill(ids)
    token = int(np.argmax(logits))
    logits, cache = lm.decode(token, cache)  # warm-up
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(logits))
        logits, cache = lm.decode(token, cache)
    return tokens / (time.perf_counter() - start)


# -- the sensitivity scan ----------------------------------------------------------------------------
def memory_lm(model: Any, folder: Path) -> Any:
    """An OnnxLM over an in-memory graph (the config and tokenizer from `folder`)."""
    import onnxruntime as ort

    from export.onnx import OnnxLM

    lm = OnnxLM.__new__(OnnxLM)
    lm.folder, lm.providers, lm.device, lm.bind = folder, ["CPUExecutionProvider"], "cpu", False
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    lm.session = ort.InferenceSession(model.SerializeToString(), options, providers=lm.providers)
    lm._read_io()
    lm._tokenizer = None
    return lm


def sensitivity(model: Any, names: list[str], inputs: Inputs, say: Callable[[str], None],
                **kw: Any) -> dict[str, Any]:
    """Each unit's KL increase when it alone is at 4 bits, the rest at 8; and the bytes it saves."""
    from export.onnx import OnnxLM

    fp32_lm = OnnxLM(inputs.fp32, threads=2)
    ref = logits_rows(fp32_lm, inputs.calib)
    del fp32_lm
    q8 = quantize(model, 8, [], block=32, acc=kw.get("acc", 4))
    q4 = quantize(model, 4, [], **kw)
    parts8, parts4 = _parts(q8), _parts(q4)
    base = kl_to(ref, memory_lm(q8, inputs.fp32), inputs.calib)
    say(f"sensitivity: all 8-bit KL {base:.5f} on {len(inputs.calib)} training conversations")
    out: dict[str, Any] = {"base_kl": base, "units": {}}
    for i, name in enumerate(names, 1):
        kl = kl_to(ref, memory_lm(_swap(q8, parts8[name], parts4[name]), inputs.fp32), inputs.calib)
        saved = _bytes(parts8[name][1]) - _bytes(parts4[name][1])
        out["units"][name] = {"kl": kl, "delta": kl - base, "bytes_saved": saved}
        say(f"  [{i}/{len(names)}] {name}: KL {kl:.5f} (+{kl - base:.5f}), saves {saved / 2**20:.2f} MiB")
    return out


def _parts(model: Any) -> dict[str, tuple[Any, list[Any]]]:
    """Original MatMul name -> (its MatMulNBits node, that node's initializers)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            out[n.name.rsplit("_Q", 1)[0]] = (n, [inits[i] for i in n.input[1:] if i in inits])
    return out


def _bytes(tensors: list[Any]) -> int:
    return sum(len(t.raw_data) for t in tensors)


def _swap(model: Any, old: tuple[Any, list[Any]], new: tuple[Any, list[Any]]) -> Any:
    """A copy of `model` with node `old` replaced by `new` (its initializers renamed `.alt`)."""
    out = type(model)()
    out.CopyFrom(model)
    graph = out.graph
    index = next(i for i, n in enumerate(graph.node) if n.name == old[0].name)
    gone = set(old[0].input[1:])
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    node = copy.deepcopy(new[0])
    for j in range(1, len(node.input)):
        node.input[j] = node.input[j] + ".alt"
    for t in new[1]:
        t2 = copy.deepcopy(t)
        t2.name = t.name + ".alt"
        graph.initializer.append(t2)
    graph.node.remove(graph.node[index])
    graph.node.insert(index, node)
    return out


def pick(scan: dict[str, Any], names: list[str], head: str, budget: int, per_byte: bool = True
         ) -> set[str]:
    """The units kept at 8 bits: the head, then the most sensitive (per byte saved) until the bytes
    they add over 4 bits reach `budget`."""
    units = scan["units"]
    keep = {head}
    spent = units[head]["bytes_saved"]
    order = sorted((n for n in names if n != head),
                   key=lambda n: -(units[n]["delta"] / units[n]["bytes_saved"] if per_byte
                                   else units[n]["delta"]))
    for n in order:
        if spent + units[n]["bytes_saved"] > budget:
            continue
        keep.add(n)
        spent += units[n]["bytes_saved"]
    return keep


# -- the calibration reader for GPTQ -----------------------------------------------------------------
def gptq_reader(fp32: Path, data: list[Any]) -> Callable[[], Any]:
    from onnxruntime.quantization import CalibrationDataReader

    from export.onnx import OnnxLM

    lm = OnnxLM(fp32, threads=1)
    feeds = []
    for s in data:
        n = len(s.input_ids)
        f = {"input_ids": np.asarray([s.input_ids], dtype=np.int64),
             "attention_mask": np.ones((1, n), dtype=np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None, :]}
        f.update(lm.empty_cache().tensors)
        feeds.append({k: v for k, v in f.items() if k in lm.input_names})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.at = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.at += 1
            return feeds[self.at - 1] if self.at <= len(feeds) else None

    return Reader


# -- main ---------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("onnxruntime", "onnx", "numpy", "torch", "transformers", "optimum-onnx"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("Model name"))
    except Exception:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--run", default="demo-qlora")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default="all")
    ap.add_argument("--sens-convs", type=int, default=4)
    ap.add_argument("--sens-tokens", type=int, default=256)
    ap.add_argument("--gptq-convs", type=int, default=8)
    ap.add_argument("--budget-mib", type=float, default=None)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the variants' folders")
    ap.add_argument("--draws", type=int, default=None,
                    help="label draws per conversation of the measured layout (default: the product's)")
    args = ap.parse_args()
    if args.draws is not None:
        from appliance.stages.export import layout as product_layout

        product_layout.DRAWS = args.draws
    say = lambda m: print(m, flush=True)  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.is_file() else {}

    n_calib = max(args.sens_convs, args.gptq_convs)
    inputs = load_inputs(args.home, args.run, args.out, n_calib, args.sens_tokens)
    say(f"held-out: {len(inputs.held_out)} conversations, {sum(len(s.targets) for s in inputs.held_out)} "
        f"scored tokens; calibration: {len(inputs.calib)} training conversations of {inputs.dataset} "
        f"(sha256 {', '.join(h[:12] for h in inputs.calib_hashes)})")
    ref_rows = reference_rows(inputs, args.out / "reference.npz")
    model, names, head = load_fp32(inputs.fp32)
    say(f"{len(names)} weight MatMuls (head {head})")
    today_four = layout(names, head, lambda n: any(k in n for k in TODAY_KEEP))
    all_four = layout(names, head, lambda n: False)

    sens_calib = Inputs(inputs.merged, inputs.fp32, inputs.held_out, inputs.calib[:args.sens_convs],
                        inputs.calib_hashes[:args.sens_convs], inputs.dataset)
    scan = saved.get("sensitivity")

    def need_scan() -> dict[str, Any]:
        nonlocal scan
        if scan is None:
            t = time.monotonic()
            scan = sensitivity(model, names, sens_calib, say)
            scan["seconds"] = round(time.monotonic() - t, 1)
            saved["sensitivity"] = scan
            results_file.write_text(json.dumps(saved, indent=1))
        return scan

    def today_bytes() -> int:
        s = need_scan()["units"]
        return sum(s[n]["bytes_saved"] for n in names if n not in today_four)

    def sens(per_byte: bool = True, extra: float = 1.0) -> set[str]:
        budget = int((args.budget_mib * 2**20) if args.budget_mib else today_bytes() * extra)
        keep = pick(need_scan(), names, head, budget, per_byte)
        return {n for n in names if n not in keep}

    def product(seed: int) -> set[str]:
        """The 4-bit set of the product's measured layout (`appliance.stages.export.layout`:
        Fisher estimate on the run's first training conversations, the fixed layout's bytes)."""
        from appliance.hfmodel import load_tokenizer
        from appliance.stages.export import layout as measured_layout
        from appliance.workspace import Workspace
        from export.onnx import weight_units

        tokenizer = load_tokenizer(inputs.merged)
        calib = measured_layout.training_samples(Workspace(args.home), args.run, tokenizer)
        units = weight_units(inputs.fp32)
        t = time.monotonic()
        scores = measured_layout.unit_scores(units, inputs.merged, calib.samples, seed=seed)
        assert not isinstance(scores, str), scores
        keep, _ = measured_layout.choose(units, scores)
        saved.setdefault("measured", {})[str(seed)] = {
            "seconds": round(time.monotonic() - t, 1), "calibration": calib.record(args.run),
            "conversation_sha256": calib.hashes, "draws": measured_layout.DRAWS}
        return {n for n in names if n not in keep}

    gptq_data = inputs.calib[:args.gptq_convs]
    variants: dict[str, Callable[[], Any]] = {
        "measured": lambda: mixed(model, names, product(0)),
        "measured-seed1": lambda: mixed(model, names, product(1)),
        "measured-seed2": lambda: mixed(model, names, product(2)),
        "today": lambda: mixed(model, names, today_four),
        "today-acc0": lambda: mixed(model, names, today_four, acc=0),
        "today-sym": lambda: mixed(model, names, today_four, sym=True),
        "today-b64": lambda: mixed(model, names, today_four, block=64),
        "today-b128": lambda: mixed(model, names, today_four, block=128),
        "all4-head8": lambda: mixed(model, names, all_four),
        "today-rtn": lambda: mixed(model, names, today_four, algo="rtn"),
        "today-kquant": lambda: mixed(model, names, today_four, algo="kquant"),
        "today-hqq": lambda: mixed(model, names, today_four, algo="hqq"),
        "today-hqq-acc4": lambda: with_acc(mixed(model, names, today_four, algo="hqq"), 4),
        "today-gptq": lambda: mixed(model, names, today_four, algo="gptq",
                                    calib=gptq_reader(inputs.fp32, gptq_data)),
        "sens": lambda: mixed(model, names, sens()),
        "sens-by-kl": lambda: mixed(model, names, sens(per_byte=False)),
        "sens-x1.25": lambda: mixed(model, names, sens(extra=1.25)),
        "sens-kquant": lambda: mixed(model, names, sens(), algo="kquant"),
        "sens-hqq": lambda: mixed(model, names, sens(), algo="hqq"),
        "sens-gptq": lambda: mixed(model, names, sens(), algo="gptq",
                                   calib=gptq_reader(inputs.fp32, gptq_data)),
        "all8": lambda: mixed(model, names, set()),
    }
    chosen = list(variants) if args.variants == "all" else args.variants.split(",")
    rows: dict[str, Any] = saved.setdefault("variants", {})
    for name in chosen:
        folder = args.out / "v" / name
        if name in rows and (folder / "model.onnx").is_file():
            say(f"{name}: measured earlier, kept")
            continue
        t = time.monotonic()
        q = variants[name]()
        quant_s = time.monotonic() - t
        size = save(q, inputs.fp32, folder)
        verdict = parity_of(folder, inputs, ref_rows)
        rows[name] = {"layout": describe_layout(q), "size_mib": size / 2**20,
                      "quantize_s": round(quant_s, 1), "ppl_increase": verdict["ppl_increase"],
                      "kl": verdict["kl"], "agreement": verdict["agreement"],
                      "perplexity": verdict["perplexity"],
                      "four_bit": sorted(n for n, b in bits_per_unit(q).items() if b == 4)}
        say(f"{name}: {rows[name]['layout']}; {size / 2**20:.1f} MiB, Δppl {verdict['ppl_increase']:+.2%}, "
            f"KL {verdict['kl']:.4f}, agreement {verdict['agreement']:.2%} ({quant_s:.0f} s to quantize)")
        results_file.write_text(json.dumps(saved, indent=1))
        del q

    measured = [n for n in chosen if n in rows]
    speeds: dict[str, list[float]] = {n: [] for n in measured}
    for r in range(args.rounds):
        for name in measured:
            speeds[name].append(decode_speed(args.out / "v" / name, args.decode_tokens))
        say(f"decode round {r + 1}: " + ", ".join(f"{n} {speeds[n][-1]:.1f}" for n in measured))
    for name in measured:
        rows[name]["decode_tok_s"] = statistics.median(speeds[name])
        rows[name]["decode_rounds"] = [round(v, 2) for v in speeds[name]]
    saved.update({"versions": versions(), "cpu": cpu_model(), "cores": os.cpu_count(),
                  "calibration": {"dataset": inputs.dataset, "split": "train",
                                  "conversation_sha256": inputs.calib_hashes,
                                  "sensitivity_conversations": args.sens_convs,
                                  "gptq_conversations": args.gptq_convs,
                                  "max_tokens": args.sens_tokens},
                  "held_out": {"conversations": len(inputs.held_out),
                               "tokens": sum(len(s.targets) for s in inputs.held_out)},
                  "command": " ".join(sys.argv)})
    results_file.write_text(json.dumps(saved, indent=1))
    base = rows.get("today", {}).get("decode_tok_s")
    print("\n| variant | layout | size MiB | Δppl | KL | agreement | decode tok/s | vs today |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in measured:
        r = rows[name]
        rel = f"{r['decode_tok_s'] / base - 1:+.1%}" if base else "-"
        print(f"| {name} | {r['layout']} | {r['size_mib']:.1f} | {r['ppl_increase']:+.2%} | {r['kl']:.4f} | "
              f"{r['agreement']:.2%} | {r['decode_tok_s']:.1f} | {rel} |")
    if not args.keep:
        shutil.rmtree(args.out / "v", ignore_errors=True)
        shutil.rmtree(args.out / "sens", ignore_errors=True)


if __name__ == "__main__":
    main()
