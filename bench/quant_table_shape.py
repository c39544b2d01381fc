"""Issue 18's quantization table on a Qwen2.5-0.5B-shaped model with a trained adapter (CPU).

Each type with and without calibration from the operator's data (GGUF below 6 bits: an importance
matrix from the run's training chats; ONNX int4: the measured 8-bit layout), through the product's
own path: a random-init model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads,
SmolLM2's tokenizer, so vocab 49,152) imported, trained briefly with the CPU recipe, merged; the
home copied; then `appliance export plan` in each copy, one with `--imatrix auto --calibrate auto`
(the defaults) and one with both off. Δppl, KL and agreement are the parity gate's on the run's
held-out chats; size is the artifact on disk; decode tokens/s is timed here afterwards, every
export in its runtime, interleaved rounds, median (the gate's own 32-token timing ran at different
moments in two jobs).

No real 0.5B model is on this box: with random weights the model's next-token distributions are
nearly flat, so the loss columns say little about a real model's (the demo run is the informative
one: bench/results/int4-calibration-cpu.md, imatrix-export-cpu.md); size and speed are the shape's.

    PYTHONPATH=. python bench/quant_table_shape.py --root /tmp/qwen05-table --steps 6

`--demo` makes the same table for `appliance demo`'s run instead (the real SmolLM2-135M-Instruct
and its 16-step adapter; the demo's own exports are removed before the plans):

    PYTHONPATH=. python bench/quant_table_shape.py --demo --root /tmp/demo-table \
        --out bench/results/quant-table-demo-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QWEN05 = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
          "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096}
MODEL, DATASET, RUN = "qwen05-shape", "dolly", "qwen05-run"
GGUF, ONNX = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"), ("int8", "int4")
CALIBRATED = ("Q5_K_M", "Q4_K_M", "int4")  # what imatrix / the measured layout change


def cli(home: Path, *args: str, timeout: int = 7200) -> str:
    cmd = [str(ROOT / ".venv" / "bin" / "appliance"), "--home", str(home), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    print(f"  {time.perf_counter() - start:.0f} s, exit {out.returncode}", flush=True)
    if out.returncode not in (0, 6):  # 6: an export failed its gate (kept, listed)
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def build_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_random_qwen2

    build_random_qwen2(folder, **QWEN05)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16)
    model.save_pretrained(folder, safe_serialization=True)  # fp16 on disk, as published models are


def prepare(root: Path, steps: int) -> tuple[Path, Path]:
    calibrated, plain = root / "calibrated", root / "plain"
    if not (calibrated / "exports" / f"{RUN}-merged").exists():
        shutil.rmtree(root, ignore_errors=True)
        build_model(root / "model")
        cli(calibrated, "models", "import", str(root / "model"), "--name", MODEL)
        cli(calibrated, "data", "import", str(ROOT / "appliance/data/dolly-sample/dolly_sample.jsonl"),
            "--model", MODEL, "--name", DATASET)
        cli(calibrated, "train", "--model", MODEL, "--dataset", DATASET, "--recipe", "smollm2-cpu",
            "--set", f"max_steps={steps}", "--set", f"eval_every={steps}", "--set", f"save_every={steps}",
            "--name", RUN, "--follow")
        cli(calibrated, "merge", RUN)
    if not plain.exists():
        shutil.copytree(calibrated, plain, symlinks=True)
    return calibrated, plain


def prepare_demo(root: Path) -> tuple[Path, Path]:
    """`appliance demo` in one home, its exports removed (the plans make them again), copied."""
    calibrated, plain = root / "calibrated", root / "plain"
    if not (calibrated / "exports" / f"{RUN}-merged").exists():
        shutil.rmtree(root, ignore_errors=True)
        cli(calibrated, "demo")
        for record in json.loads(cli(calibrated, "exports", "list", "--json")):
            if record["name"] != f"{RUN}-merged":
                cli(calibrated, "exports", "rm", record["name"], "--yes")
    if not plain.exists():
        shutil.copytree(calibrated, plain, symlinks=True)
    return calibrated, plain


def frontier(home: Path) -> dict[str, dict[str, Any]]:
    return {r["type"]: r for r in json.loads(cli(home, "exports", "frontier", RUN, "--json"))["exports"]}


def decode_rounds(homes: dict[str, Path], rounds: int, tokens: int) -> dict[str, list[float]]:
    """Each export's greedy decode in its runtime, `tokens` after the first held-out prompt, one
    export after the other in each round."""
    from appliance.hfmodel import load_tokenizer
    from appliance.stages.verify import frontier as fr
    from appliance.workspace import Workspace
    from export import gguf, onnx

    fr.DECODE_TOKENS, fr.REPEATS = tokens, 1

    tok = load_tokenizer(homes["calibrated"] / "exports" / f"{RUN}-merged")
    ids = tok.apply_chat_template([{"role": "user", "content": "Write three sentences about the sea."}],
                                  add_generation_prompt=True)
    opened: dict[str, Any] = {}
    for label, home in homes.items():
        ws = Workspace(home)
        for t in (*GGUF, *ONNX):
            if label == "plain" and t not in CALIBRATED:
                continue
            fmt = "onnx" if t in ONNX else "gguf"
            record = ws.get("export", f"{RUN}-{fmt}-{t.lower()}")
            if fmt == "gguf":
                opened[f"{t}/{label}"] = gguf.GgufLM(record.path / f"{RUN}-{t}.gguf", n_ctx=1024)
            else:
                opened[f"{t}/{label}"] = onnx.OnnxLM(record.path / "onnx")
    rates: dict[str, list[float]] = {k: [] for k in opened}
    for r in range(rounds):
        for key, lm in opened.items():
            rates[key].append(fr.decode_speed(lm, ids)["decode_tokens_per_s"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]}" for k, v in rates.items()), flush=True)
    for lm in opened.values():
        getattr(lm, "close", lambda: None)()
    return rates


def table(rows: dict[str, dict[str, dict[str, Any]]], rates: dict[str, list[float]]) -> str:
    lines = ["| type | calibration | size MiB | Δppl | KL | agreement | decode tok/s | gate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in (*GGUF, *ONNX):
        for label in ("plain", "calibrated"):
            if label == "plain" and t not in CALIBRATED:
                continue
            r = rows[label][t]
            how = {"plain": "off", "calibrated": "imatrix" if t in GGUF else "measured layout"}[label]
            if t not in CALIBRATED:
                how = "- (6+ bits)" if t in GGUF else "- (int8)"
            speed = statistics.median(rates[f"{t}/{label}"])
            lines.append(f"| {t} | {how} | {r['size_bytes'] / 2**20:.1f} | {r['ppl_increase']:+.2%} | "
                         f"{r['kl']:.4f} | {r['agreement']:.2%} | {speed:.1f} | {r['status']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/qwen05-table"))
    ap.add_argument("--steps", type=int, default=6, help="training steps of the adapter")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/quant-table-qwen05-shape-cpu.json")
    ap.add_argument("--demo", action="store_true", help="the table for `appliance demo`'s run")
    args = ap.parse_args()
    os.environ.setdefault("APPLIANCE_THREADS", "2")
    if args.demo:
        global RUN
        RUN = "demo-qlora"
    calibrated, plain = prepare_demo(args.root) if args.demo else prepare(args.root, args.steps)
    if set(frontier(calibrated)) != {*GGUF, *ONNX}:  # a rerun keeps a finished half
        cli(calibrated, "export", "plan", RUN, "--gguf", ",".join(GGUF), "--onnx", ",".join(ONNX))
    if set(frontier(plain)) != set(CALIBRATED):
        cli(plain, "export", "plan", RUN, "--gguf", ",".join(t for t in GGUF if t in CALIBRATED),
            "--onnx", "int4", "--imatrix", "off", "--calibrate", "off")
    rows = {"calibrated": frontier(calibrated), "plain": frontier(plain)}
    rates = decode_rounds({"calibrated": calibrated, "plain": plain}, args.rounds, args.decode_tokens)
    import onnxruntime
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__}
    print(table(rows, rates))
    args.out.write_text(json.dumps({"rows": rows, "decode_rounds": rates, "versions": versions,
                                    "cpu": platform.processor() or platform.machine(),
                                    "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
