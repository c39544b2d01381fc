"""Training throughput and peak memory: our engine vs plain transformers + peft + bitsandbytes
(the careful user's QLoRA) and, when liger-kernel is installed, the same with Liger kernels.

Random-init models shaped like Llama-3.2-1B (batch 4 x 2048) and Qwen2.5-7B (batch 1 x 2048), the
same random tokens for every row, 3 warm-up steps then 10 timed ones. Each row runs in its own
process so peak-memory figures do not mix. Prints every row, then ours/baseline ratios, and writes
the whole as JSON.

Engines (`--engines`, comma-separated): baseline, liger (when liger-kernel is installed), ours
(the product's engine: with Liger's RoPE/RMSNorm/SwiGLU when liger-kernel is installed, as the
product trains; FUSED_KERNELS=off for without), ours-adamw and graphed-adamw (those with optimizer = "adamw":
torch's fused AdamW on CUDA instead of paged 8-bit AdamW), ours-offload (the same with offload_activations),
ours-compiled (bench only: each decoder layer one torch.compile region, as Unsloth compiles them),
ours-graphs (the product's engine with cuda_graphs = on: the training loop's graphed micro-batch,
graphed.Steps, with the product's dropout when OURS_DROPOUT is set), ours-graphs-offload (that with
offload_activations: the copies to host memory captured in the graph), graphed (bench only, the first
version: forward + backward replayed as one CUDA graph without dropout),
unsloth (when unsloth is installed: the same folder, LoRA shape and optimizer). `--repeat N` runs
every row N times, engines interleaved, and reports the median run with the spread.

Usage (GPU host): python bench/train_throughput.py [--shapes llama1b,qwen7b] [--out FILE.json]
The baseline reproduces ../shared/bench/hf_qlora_baseline.py (NF4 double quant, bf16 compute,
LoRA r=16 on all linear layers, prepare_model_for_kbit_training, gradient checkpointing in train
mode, SDPA, AdamW).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True), 4, 2048),
    "qwen7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False), 1, 2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 3, 10


def build(shape: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = f"/tmp/rand-{shape}"
    if not os.path.exists(path):
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape][0])
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        save_tokenizer(path)
        del model
        torch.cuda.empty_cache()
    return path


def save_tokenizer(path: str) -> None:
    """A minimal tokenizer beside the random weights: Unsloth's loader reads one (the batches are
    random token ids, so its vocabulary does not matter)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(path)


def baseline_step(path: str, liger: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": 0},
                                                 dtype=torch.bfloat16, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def ours_step(path: str, offload: bool = False, compile_layers: bool = False, graphs: bool = False):
    import torch

    from appliance.stages.train.config import validate
    from appliance.stages.train.fastlora import weights_changed
    from appliance.stages.train.recipe import causal_lm_loss, load_model, make_optimizer

    cfg = validate({"lora_r": 16, "lora_alpha": 32, "target_modules": TARGETS,
                    "lora_dropout": float(os.environ.get("OURS_DROPOUT", "0")),  # the product's: 0.05
                    "learning_rate": 2e-4, "optimizer": os.environ.get("OURS_OPTIMIZER", "auto"),
                    "fused_kernels": os.environ.get("FUSED_KERNELS", "auto"),
                    "offload_activations": offload, "cuda_graphs": "on" if graphs else "off",
                    "unpack_scales": os.environ.get("GRAPHED_UNPACK", "1") == "1"})  # 0: bnb's packed scales
    fp16 = os.environ.get("OURS_DTYPE") == "fp16"  # a T4's compute dtype, with loss scaling
    model = load_model(Path(path), cfg, "cuda", torch.float16 if fp16 else torch.bfloat16)
    print(f"ours: {model.appliance_kernels}", file=sys.stderr, flush=True)
    if compile_layers:  # bench only: each decoder layer one torch.compile region, as Unsloth does
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=False)
    model.train()
    opt = make_optimizer(model, cfg, "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    if graphs:  # the training loop's graphed micro-batch (recipe.Trainer._micro)
        from appliance.stages.train import graphed
        from appliance.stages.train.recipe import head_chunk

        steps = graphed.Steps(model, 1, 0, head_chunk(model))

        def graphed_step(x):
            weight = scaler.scale(torch.full((), 1 / (x.shape[0] * (x.shape[1] - 1)), device="cuda"))
            total, n = steps(x, x, weight)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=False)
            weights_changed()
            return total / n

        return graphed_step

    def step(x):
        total, n = causal_lm_loss(model, {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)})
        loss = total / n
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        weights_changed()
        return loss

    return step


def graphed_step(path: str, shape: str):
    """Our engine with the step's forward and backward replayed as a CUDA graph (graphed.py)."""
    import torch

    from appliance.stages.train import graphed
    from appliance.stages.train.config import validate
    from appliance.stages.train.fastlora import weights_changed
    from appliance.stages.train.recipe import head_chunk, load_model, make_optimizer

    cfg = validate({"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": TARGETS,
                    "learning_rate": 2e-4, "optimizer": os.environ.get("OURS_OPTIMIZER", "auto"),
                    "unpack_scales": os.environ.get("GRAPHED_UNPACK", "1") == "1",
                    "fused_kernels": os.environ.get("FUSED_KERNELS", "auto"), "cuda_graphs": "on"})
    model = load_model(Path(path), cfg, "cuda", torch.bfloat16)  # checkpointing set for graphs
    model.train()
    opt = make_optimizer(model, cfg, "cuda")
    chunk = head_chunk(model)
    held: dict = {}  # one graph per batch shape (--max-seq steps through several)

    def step(x):
        if x.shape not in held:
            held.clear()
            held[x.shape] = graphed.GraphedStep(model, x, x, chunk)
        total, count = held[x.shape](x, x, 1.0 / (x.shape[0] * (x.shape[1] - 1)))
        opt.step()
        opt.zero_grad(set_to_none=False)
        weights_changed()
        return total / count

    return step


def unsloth_step(path: str, shape: str):
    """Unsloth's QLoRA on the same folder: its loader, its LoRA kernels, its gradient
    checkpointing, the same LoRA shape and the same optimizer as ours (paged 8-bit AdamW)."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    import bitsandbytes as bnb
    import torch
    from unsloth import FastLanguageModel  # before transformers: it patches it as it loads

    model, _ = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=SHAPES[shape][2],
                                                 dtype=torch.bfloat16, load_in_4bit=True,
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0,
                                             target_modules=TARGETS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=0)
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def unsloth_first(engine: str) -> None:
    """Unsloth patches transformers as it is imported: before build() imports transformers."""
    if engine == "unsloth":
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
        import unsloth  # noqa: F401


def make_step(engine: str, path: str, shape: str):
    if engine.endswith("-adamw"):  # ours or graphed with optimizer = "adamw" (fused on CUDA)
        os.environ["OURS_OPTIMIZER"] = "adamw"
        engine = engine.removesuffix("-adamw")
    if engine in ("ours", "ours-offload", "ours-compiled", "ours-graphs", "ours-graphs-offload"):
        return ours_step(path, offload=engine.endswith("-offload"), compile_layers=engine == "ours-compiled",
                         graphs=engine.startswith("ours-graphs"))
    if engine == "graphed":
        return graphed_step(path, shape)
    if engine == "unsloth":
        return unsloth_step(path, shape)
    return baseline_step(path, liger=engine == "liger")


def run_row(engine: str, shape: str) -> dict:
    """One row, in this process: warm up, time, measure. LOSS_STEPS=N adds N more steps on fresh
    batches (the same for every row) to compare loss curves."""
    import torch

    _, batch, seq = SHAPES[shape]
    unsloth_first(engine)
    path = build(shape)
    step = make_step(engine, path, shape)
    torch.manual_seed(1234)
    x = torch.randint(0, SHAPES[shape][0]["vocab_size"], (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    extra = int(os.environ.get("LOSS_STEPS", "0"))
    if extra:  # a loss curve over varied data: a bigram-ish stream so there is something to learn
        gen = torch.Generator(device="cuda").manual_seed(99)
        curve = []
        for _ in range(extra):
            start = torch.randint(0, 512, (batch, 1), device="cuda", generator=gen)
            tokens = (start + torch.arange(seq, device="cuda") * 7) % 512  # learnable pattern
            curve.append(round(float(step(tokens)), 4))
        return {"engine": engine, "shape": shape, "batch": batch, "seq": seq, "curve": curve}
    losses = [float(step(x)) for _ in range(WARMUP)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    losses += [float(step(x)) for _ in range(TIMED)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"engine": engine, "shape": shape, "batch": batch, "seq": seq,
            "tokens_per_s": round(TIMED * batch * seq / seconds),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "settings": settings(engine),
            "losses": [round(v, 4) for v in losses]}


def settings(engine: str) -> dict:
    """What the environment changed for our rows (the product's defaults otherwise)."""
    if not engine.startswith(("ours", "graphed")):
        return {}
    keys = ("FUSED_KERNELS", "OURS_DROPOUT", "OURS_DTYPE", "OURS_OPTIMIZER", "GRAPHED_UNPACK")
    return {k: os.environ[k] for k in keys if k in os.environ}


MAX_SEQS = [2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768]
T4_BUDGET_GIB = 15.0


def max_seq_row(engine: str, shape: str) -> dict:
    """Largest sequence at batch 1 whose training step peaks under 15 GiB (a 16 GB T4)."""
    import torch

    unsloth_first(engine)
    path = build(shape)
    step = make_step(engine, path, shape)
    peaks: dict[int, float] = {}
    reserved: dict[int, float] = {}  # what the allocator held: closer to what a 16 GB card must have
    for seq in MAX_SEQS:
        x = torch.randint(0, SHAPES[shape][0]["vocab_size"], (1, seq), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        try:
            step(x)
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            break
        peaks[seq] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        reserved[seq] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if peaks[seq] > T4_BUDGET_GIB:
            break
    fitting = [s for s, p in peaks.items() if p <= T4_BUDGET_GIB]
    return {"engine": engine, "shape": shape, "peaks_gib": peaks, "reserved_gib": reserved,
            "settings": settings(engine),
            "max_seq_under_15gib": max(fitting, default=0)}


def installed(engine: str) -> bool:
    """Liger's and Unsloth's rows run where their packages are installed."""
    import importlib.util

    module = {"liger": "liger_kernel", "unsloth": "unsloth"}.get(engine)
    if module is None or importlib.util.find_spec(module) is not None:
        return True
    print(f"{engine}: skipped ({module} not installed)")
    return False


def medians(rows: list[dict]) -> list[dict]:
    """One row per (engine, shape): the median run by tokens/s (its losses and reserved memory),
    the spread of the runs' tokens/s, and the median of their allocated peaks."""
    import statistics

    out = []
    for key in dict.fromkeys((r["engine"], r["shape"]) for r in rows if "tokens_per_s" in r):
        runs = sorted((r for r in rows if (r["engine"], r["shape"]) == key and "tokens_per_s" in r),
                      key=lambda r: r["tokens_per_s"])
        mid = dict(runs[len(runs) // 2])
        mid["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
        mid["peak_gib"] = statistics.median(r["peak_gib"] for r in runs)
        out.append(mid)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama1b,qwen7b")
    parser.add_argument("--engines", default="baseline,liger,ours")
    parser.add_argument("--out", default="train_throughput.json")
    parser.add_argument("--row", nargs=2, metavar=("ENGINE", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (median reported)")
    parser.add_argument("--out-rows", help="also write every run's row here")
    parser.add_argument("--max-seq", action="store_true",
                        help="instead: the largest batch-1 sequence under 15 GiB, per engine")
    args = parser.parse_args()
    if args.row:
        func = max_seq_row if os.environ.get("MAX_SEQ_MODE") else run_row
        print("ROW " + json.dumps(func(*args.row)), flush=True)
        return
    if args.max_seq:
        os.environ["MAX_SEQ_MODE"] = "1"
    import torch

    rows, env = [], {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    engines = [e for e in args.engines.split(",") if installed(e)]
    for shape, _rep, engine in ((s, r, e) for s in args.shapes.split(",") for r in range(args.repeat)
                                for e in engines):  # engines interleaved, repeat by repeat
        out = subprocess.run([sys.executable, __file__, "--row", engine, shape], capture_output=True,
                             text=True, env=env if engine.startswith("ours") else os.environ)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line is None:
            print(f"{shape} {engine}: FAILED\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(line[4:]))
        if args.out_rows:  # after every row: a run stopped by a time limit keeps what it measured
            Path(args.out_rows).write_text(json.dumps(rows, indent=1))
        r = rows[-1]
        if "curve" in r:
            print(f"{shape:8} {engine:9} loss curve: " + " ".join(f"{v:.3f}" for v in r["curve"][::5]))
            continue
        if args.max_seq:
            print(f"{shape:8} {engine:9} largest batch-1 sequence under {T4_BUDGET_GIB} GiB: "
                  f"{r['max_seq_under_15gib']}  (peaks {r['peaks_gib']}; reserved {r['reserved_gib']})",
                  flush=True)
            continue
        print(f"{shape:8} {engine:9} {r['tokens_per_s']:>7} tokens/s  {r['peak_gib']:6.2f} GiB  "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
    if args.out_rows:
        Path(args.out_rows).write_text(json.dumps(rows, indent=1))
    rows = [r for r in rows if "curve" in r or "tokens_per_s" not in r] + medians(rows)
    for shape in args.shapes.split(","):
        by = {r["engine"]: r for r in rows if r["shape"] == shape and "curve" in r}
        if "ours" in by and "baseline" in by:
            o, b = by["ours"]["curve"], by["baseline"]["curve"]
            diffs = [abs(x - y) for x, y in zip(o, b)]
            print(f"{shape}: loss curves over {len(o)} steps: max |ours - baseline| {max(diffs):.4f}, "
                  f"mean {sum(diffs) / len(diffs):.4f}; final {o[-1]:.4f} vs {b[-1]:.4f}")
    for shape in [] if args.max_seq else args.shapes.split(","):
        by = {r["engine"]: r for r in rows if r["shape"] == shape and "tokens_per_s" in r}
        if "ours" in by and "baseline" in by:
            o, b = by["ours"], by["baseline"]
            diff = max(abs(x - y) / y for x, y in zip(o["losses"], b["losses"]))
            print(f"{shape}: ours/baseline speed {o['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
                  f"memory {o['peak_gib'] / b['peak_gib']:.2f}x, worst loss difference {diff:.2%}")
            if "liger" in by:
                g = by["liger"]
                print(f"{shape}: ours/liger speed {o['tokens_per_s'] / g['tokens_per_s']:.2f}x, "
                      f"memory {o['peak_gib'] / g['peak_gib']:.2f}x")
        for ref in ("unsloth", "baseline"):
            for engine in ("ours", "ours-adamw", "ours-offload", "ours-compiled", "ours-graphs",
                           "ours-graphs-adamw", "ours-graphs-offload", "ours-graphs-offload-adamw",
                           "graphed", "graphed-adamw"):
                if ref in by and engine in by:
                    o, u = by[engine], by[ref]
                    print(f"{shape}: {engine}/{ref} speed {o['tokens_per_s'] / u['tokens_per_s']:.2f}x "
                          f"(runs {o['runs_tokens_per_s']} vs {u['runs_tokens_per_s']}), "
                          f"memory {o['peak_gib'] / u['peak_gib']:.2f}x")
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
