"""GGUF on a CUDA GPU: decode speed of the appliance's engine beside llama.cpp's own llama-bench, both
built from the same sources, each as a share of the card's memory-bandwidth limit.

For each shape (random weights are fine for speed) it writes an HF Llama folder (the SmolLM2
tokenizer from tests/fixtures), converts it to F16 GGUF with llama.cpp's converter, quantizes it with
llama-quantize, then for each type measures:
- llama-bench: `-ngl 99 -p 0 -n N -r 3` (decode from an empty context), tokens/s;
- ours: `appliance.runtime.llama_engine.LlamaEngine` with every layer on the GPU, greedy, stop tokens
  biased away (random weights would stop anywhere), N tokens after a short chat prompt, median of 3:
  decode tokens/s (first token to last) and time to first token;
- the bandwidth limit: GGUF bytes read per token (every tensor but the token embedding) over the
  card's measured device-to-device copy bandwidth (torch, 2 x bytes / time);
  efficiency = tokens/s x bytes / bandwidth.

    python3 bench/gguf_gpu.py --build build/llama-cuda --converter DIR --shapes 0.5b --types Q4_K_M,Q8_0,F16

Prints JSON lines and a Markdown table; writes --out (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "fixtures" / "smollm2-tokenizer"
SHAPES = {  # Llama architecture, SmolLM2's 49,152-token vocabulary
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8},
}


def bandwidth_gbs() -> float:
    import torch

    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times) / 1e9


def random_model(shape: str, folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, folder / f.name)
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.bfloat16) * 0.02).cpu()

    tensors = {"model.embed_tokens.weight": rand(49152, h), "lm_head.weight": rand(49152, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    shard, part = {}, 0
    for layer in range(n):
        p = f"model.layers.{layer}."
        shard |= {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                  p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                  p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
                  p + "mlp.down_proj.weight": rand(h, i),
                  p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        if sum(t.numel() for t in shard.values()) > 2e9:
            save_file(shard, str(folder / f"model-{part:05d}.safetensors"))
            shard, part = {}, part + 1
    save_file({**shard, **tensors}, str(folder / f"model-{part:05d}.safetensors"))
    return folder


def convert(hf: Path, out: Path, converter: Path) -> None:
    """The product's own conversion (export.gguf.convert: it normalises a tokenizer.json written by
    a GGUF import, which llama.cpp's converter alone turns into a vocabulary its tokenizer aborts
    on), with `converter` as the share's llama.cpp folder."""
    share = out.parent / "share"
    share.mkdir(exist_ok=True)
    if not (share / "llama.cpp").exists():
        (share / "llama.cpp").symlink_to(converter.resolve())
    os.environ["APPLIANCE_SHARE"] = str(share)
    from export import gguf

    gguf.convert(hf, out, outtype="f16")


def make_ggufs(shape: str, work: Path, build: Path, converter: Path, types: list[str]) -> dict[str, Path]:
    hf = random_model(shape, work / f"hf-{shape}")
    f16 = work / f"{shape}-F16.gguf"
    convert(hf, f16, converter)
    shutil.rmtree(hf)
    out = {}
    for qtype in types:
        if qtype == "F16":
            out[qtype] = f16
            continue
        dst = work / f"{shape}-{qtype}.gguf"
        subprocess.run([str(build / "bin" / "llama-quantize"), str(f16), str(dst), qtype],
                       check=True, capture_output=True)
        out[qtype] = dst
    return out


def llama_bench(build: Path, gguf: Path, tokens: int) -> float:
    done = subprocess.run([str(build / "bin" / "llama-bench"), "-m", str(gguf), "-ngl", "99", "-p", "0",
                           "-n", str(tokens), "-r", "3", "-o", "json"], check=True, capture_output=True,
                          text=True)
    rows = json.loads(done.stdout)
    return float(next(r["avg_ts"] for r in rows if r.get("n_gen") == tokens))


def process_gpu_mib() -> float:
    """This process's GPU memory as nvidia-smi reports it (the CUDA context included)."""
    done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True)
    rows = [line.split(",") for line in done.stdout.splitlines() if line.strip()]
    return sum(float(mib) for pid, mib in rows if int(pid) == os.getpid())


CONTEXT = 2048


def ours(gguf: Path, tokens: int) -> tuple[float, float, float]:
    import llama_cpp  # noqa: F401  # before numpy (docs/PITFALLS.md, "GPU runtime")

    from appliance.runtime.engine import Artifact
    from appliance.runtime.llama_engine import LlamaEngine

    engine = LlamaEngine(Artifact(gguf.stem, "gguf", gguf, "unknown"), context_length=CONTEXT, gpu=True)
    try:
        rate, first = decode_timing(engine, tokens)
        used = process_gpu_mib()
    finally:
        engine.close()
    return rate, first, used


def decode_timing(engine: Any, tokens: int) -> tuple[float, float]:
    """Greedy, `tokens` new tokens after a short chat prompt, stop tokens biased away: (decode
    tokens/s from the first token to the last, time to first token s), medians of 3 after a warm-up."""
    from appliance.runtime.engine import Sampling

    bias = tuple((int(t), -100.0) for t in engine.stop_ids)
    rates, firsts = [], []
    for _ in range(4):  # the first is a warm-up
        start = time.perf_counter()
        stamps = []
        for item in engine.generate([{"role": "user", "content": "Write a long story."}],
                                    Sampling(temperature=0.0, max_tokens=tokens, logit_bias=bias)):
            if getattr(item, "token_id", -1) >= 0:  # a Delta per generated token
                stamps.append(time.perf_counter())
        if len(stamps) >= 2:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            firsts.append(stamps[0] - start)
    return statistics.median(rates[1:]), statistics.median(firsts[1:])


def ours_in_child(gguf: Path, tokens: int) -> tuple[float, float, float]:
    """`ours` in a process where torch never touched CUDA (two CUDA runtimes in one process crash)."""
    rate, ttft, used = in_child("bench.gguf_gpu", f"ours(Path({str(gguf)!r}), {tokens})")  # type: ignore[misc]
    return float(rate), float(ttft), float(used)


def in_child(module: str, call: str) -> Any:
    """`call` (an expression over `module`'s names) in a fresh process, its JSON result back."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from {module} import *; print('RESULT', json.dumps({call}))")
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                          text=True, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the child failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(line[7:])


def tensor_bytes(gguf: Path) -> int:
    """Bytes a decode step reads: every tensor but the token embedding (one row of it is read)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors if t.name != "token_embd.weight"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, required=True, help="llama.cpp CUDA build (bin/, libllama)")
    ap.add_argument("--converter", type=Path, required=True, help="folder of convert_hf_to_gguf.py")
    ap.add_argument("--shapes", default="0.5b")
    ap.add_argument("--types", default="Q4_K_M,Q8_0,F16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-gpu"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    gbs = bandwidth_gbs()
    info = {"gpu": torch.cuda.get_device_name(), "bandwidth_gbs": round(gbs, 1),
            "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        args.work.mkdir(parents=True, exist_ok=True)
        for qtype, gguf in make_ggufs(shape, args.work, args.build, args.converter,
                                      args.types.split(",")).items():
            size = tensor_bytes(gguf)
            ref = llama_bench(args.build, gguf, args.tokens)
            from appliance.runtime import fit

            est = fit.footprint("gguf", gguf, gguf.stem, CONTEXT).total + fit.CUDA_OVERHEAD
            try:
                rate, ttft, used = ours_in_child(gguf, args.tokens)
            except RuntimeError as exc:  # the engine's row is missing; llama-bench's stays
                print(json.dumps({"shape": shape, "type": qtype, "engine_error": str(exc)[-600:]}),
                      flush=True)
                rate, ttft, used = float("nan"), float("nan"), float("nan")
            row = {"shape": shape, "type": qtype, "gib": round(size / 2**30, 3),
                   "llama_bench_tps": round(ref, 1), "ours_tps": round(rate, 1),
                   "ours_vs_llama_bench": round(rate / ref, 3), "ttft_ms": round(ttft * 1000, 1),
                   "limit_tps": round(gbs * 1e9 / size, 1),
                   "ours_pct_of_limit": round(100 * rate * size / (gbs * 1e9), 1),
                   "llama_bench_pct_of_limit": round(100 * ref * size / (gbs * 1e9), 1),
                   "gpu_mib_used": used if used != used else round(used),
                   "fit_estimate_mib": round(est / 2**20)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if qtype != "F16":
                gguf.unlink()
        for left in args.work.glob(f"{shape}-*.gguf"):
            left.unlink()
    table = ["| shape | type | GiB | llama-bench tok/s | ours tok/s | ours/llama-bench | TTFT ms | "
             "% of limit (ours) | % of limit (llama-bench) | GPU MiB used | estimate MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['shape']} | {r['type']} | {r['gib']} | {r['llama_bench_tps']} | {r['ours_tps']} | "
              f"{r['ours_vs_llama_bench']} | {r['ttft_ms']} | {r['ours_pct_of_limit']} | "
              f"{r['llama_bench_pct_of_limit']} | {r['gpu_mib_used']} | {r['fit_estimate_mib']} |"
              for r in rows]
    print("\n".join(table))
    if args.out:
        args.out.write_text(json.dumps({**info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
