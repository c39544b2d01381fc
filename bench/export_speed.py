"""Export time and peak memory (merge, GGUF, ONNX), and CPU decode speed of each artifact next to
the memory-bandwidth roofline of this machine.

Models: the real SmolLM2-135M-Instruct (the embedded GGUF, dequantized by transformers) and a
random model shaped like Qwen2.5-0.5B (hidden 896, 24 layers, SmolLM2's tokenizer so vocab 49,152),
each with a random LoRA adapter (r=16, all linear layers). Each stage runs in its own process and
its peak RSS is that process's maximum resident set. Decode: greedy, 64 new tokens after a short
chat prompt, 2 threads. Roofline: bytes read per token (the weights a token reads: the file minus
the embedding rows it does not touch, for an untied head all of it) over the bandwidth measured
here (a 512 MiB copy, read + write).

Usage: python bench/export_speed.py [--models smollm2,qwen0.5b] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QWEN05 = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
          "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096}
PROMPT = [{"role": "user", "content": "Write three sentences about the sea."}]


def build(name: str, root: Path) -> tuple[Path, Path]:
    """The model folder (fp16 on disk, as most published models are) and a random adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import TOKENIZER_DIR, TOKENIZER_FILES, build_random_qwen2

    folder, adapter = root / name, root / f"{name}-adapter"
    if name == "smollm2":
        from appliance import stack

        gguf = stack.default_model_path(verify=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float16)
        model.save_pretrained(folder, safe_serialization=True)
        for f in TOKENIZER_FILES:
            (folder / f).write_bytes((TOKENIZER_DIR / f).read_bytes())
    else:
        build_random_qwen2(folder, **QWEN05)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16)
        model.save_pretrained(folder, safe_serialization=True)
    peft = get_peft_model(model.float(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    peft.save_pretrained(adapter, safe_serialization=True)
    return folder, adapter


# The stage's own high-water mark (VmHWM: ru_maxrss would carry this bench's own peak over the
# fork + exec) or its children's (llama.cpp's converter runs in one), whichever is larger.
PEAK = ("\nimport re, resource\nhwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())"
        "[1])\nprint('PEAK', max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024)")


def stage(name: str, code: str) -> dict:
    """Run `code` in a fresh process: its wall time and peak RSS (itself or a child it ran, such as
    llama.cpp's converter, whichever was larger)."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", "from appliance import offline; offline.install()\n" + code
                          + PEAK], capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    rss = int(next(ln for ln in out.stdout.splitlines() if ln.startswith("PEAK ")).split()[1])
    return {"stage": name, "seconds": round(seconds, 1), "peak_rss_bytes": rss}


def bandwidth() -> float:
    import numpy as np

    src = np.ones(512 * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t))
    return best


def decode_speed(kind: str, path: Path, model_dir: Path) -> float:
    from appliance.hfmodel import load_tokenizer

    tok = load_tokenizer(model_dir)
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    if kind == "gguf":
        from export.gguf import GgufLM

        lm = GgufLM(path, n_ctx=512, n_threads=2)
    else:
        from export.onnx import OnnxLM

        lm = OnnxLM(path, threads=2)
    ids = lm.tokenize(text)
    lm.generate(ids, 8, [])  # warm-up
    t = time.perf_counter()
    out = lm.generate(ids, 64, [])
    return len(out) / (time.perf_counter() - t)


def run_model(name: str, root: Path, bw: float) -> list[dict]:
    folder, adapter = build(name, root)
    fp16_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    merged, gg, ox = root / f"{name}-merged", root / f"{name}-gguf", root / f"{name}-onnx"
    for d in (merged, gg, Path(f"{ox}-fp32"), Path(f"{ox}-int4")):  # outputs of an earlier run
        shutil.rmtree(d, ignore_errors=True)
    for d in (merged, gg):
        d.mkdir()
    rows = [
        stage("merge", f"from appliance.stages.merge.weights import merge_folder; from pathlib import Path\n"
                       f"merge_folder(Path('{folder}'), Path('{adapter}'), Path('{merged}'), dtype='fp16')"),
        stage("gguf F16", f"from export.gguf import convert; from pathlib import Path\n"
                          f"convert(Path('{merged}'), Path('{gg}/m-F16.gguf'))"),
    ]
    for q in ("Q8_0", "Q4_K_M"):
        rows.append(stage(f"gguf {q}", f"from export.gguf import quantize; from pathlib import Path\n"
                                       f"quantize(Path('{gg}/m-F16.gguf'), Path('{gg}/m-{q}.gguf'), '{q}')"))
    rows.append(stage("onnx fp32", f"from export.onnx import export_onnx; from pathlib import Path\n"
                                   f"export_onnx(Path('{merged}'), Path('{ox}-fp32'), 'fp32')"))
    rows.append(stage("onnx int4", f"from export.onnx import quantize_onnx; from pathlib import Path\n"
                                   f"quantize_onnx(Path('{ox}-fp32'), Path('{ox}-int4'), 'int4')"))
    for r in rows:
        r["model"], r["fp16_bytes"] = name, fp16_bytes
    artifacts = [("gguf", gg / f"m-{q}.gguf", q) for q in ("F16", "Q8_0", "Q4_K_M")] + \
                [("onnx", Path(f"{ox}-{p}"), p) for p in ("fp32", "int4")]
    for kind, path, label in artifacts:
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir())
        speed = decode_speed(kind, path, merged)
        rows.append({"model": name, "stage": f"decode {kind} {label}", "tokens_per_s": round(speed, 1),
                     "bytes": size, "roofline_tokens_per_s": round(bw / size, 1)})
    return rows


def _line(name: str, r: dict) -> str:
    if "seconds" in r:
        rss = r["peak_rss_bytes"]
        return (f"{name:9} {r['stage']:12} {r['seconds']:7.1f} s  peak RSS {rss / 2**30:5.2f} GiB "
                f"({rss / r['fp16_bytes']:.2f}x the fp16 model)")
    return (f"{name:9} {r['stage']:22} {r['tokens_per_s']:7.1f} tokens/s  ({r['bytes'] / 2**20:.0f} MiB, "
            f"roofline {r['roofline_tokens_per_s']:.0f} tokens/s: "
            f"{r['tokens_per_s'] / r['roofline_tokens_per_s']:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2,qwen0.5b")
    parser.add_argument("--out", default="export_speed.json")
    parser.add_argument("--root", default="/tmp/appliance-export-bench")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    bw = bandwidth()
    print(f"memory bandwidth (512 MiB copy, read + write, 1 thread): {bw / 1e9:.1f} GB/s")
    rows = []
    for name in args.models.split(","):
        for r in run_model(name, root, bw):
            rows.append(r)
            print(_line(name, r), flush=True)
    Path(args.out).write_text(json.dumps({"bandwidth_bytes_per_s": bw, "cpus": os.cpu_count(),
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
