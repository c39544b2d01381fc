"""Measure the training engine's peak GPU memory over a grid of shapes and batch x sequence sizes,
for the memory planner to be fitted and checked against (`appliance/data/planner-calibration.json`).

Random-init models shaped like real ones (no download), loaded exactly as training loads them
(`train.load_model`: NF4 + double quant, LoRA on all linear layers, gradient checkpointing) and
stepped with the engine's loss and optimizer on full-length random batches, every token trained
(the worst case for the loss: SFT batches train only the assistant tokens). Records, per point: torch's
peak allocated and reserved bytes, and the device's used bytes (which include the CUDA context and
bitsandbytes' paged optimizer buffers, invisible to torch's allocator).

Usage (GPU host): python bench/calibrate_planner.py OUT.json
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "tie_word_embeddings": True},
    "qwen2.5-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "tie_word_embeddings": True},
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "tie_word_embeddings": True},
}
GRID = [(1, 512), (2, 1024), (4, 512), (4, 1024), (8, 512), (1, 2048), (4, 2048)]


def build(folder: Path, shape: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=8192, **shape)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def measure(folder: Path, name: str, shape: dict) -> list[dict]:
    import torch

    from appliance.stages.train.config import validate
    from appliance.stages.train.recipe import causal_lm_loss, load_model, make_optimizer

    cfg = validate({"lora_r": 16, "lora_alpha": 32, "optimizer": "paged_adamw_8bit"})
    torch.cuda.empty_cache()
    free0, _ = torch.cuda.mem_get_info()
    model = load_model(folder, cfg, "cuda", torch.bfloat16)
    model.train()
    optimizer = make_optimizer(model, cfg, "cuda")
    weights = torch.cuda.memory_allocated()
    points = []
    for batch, seq in GRID:
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), device="cuda")
        try:
            started = time.perf_counter()
            batch_inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
            for _ in range(2):
                total, n = causal_lm_loss(model, batch_inputs)
                (total / n).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / 2
        except torch.cuda.OutOfMemoryError:
            continue
        free, _ = torch.cuda.mem_get_info()
        points.append({
            "shape": name, "batch": batch, "seq": seq, "lora_r": 16, "optimizer": "paged_adamw_8bit",
            "gradient_checkpointing": True, "weights_bytes": weights,
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(),
            "device_used": free0 - free, "tokens_per_s": round(batch * seq / seconds),
        })
        print(json.dumps(points[-1]), flush=True)
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return points


def main() -> None:
    import torch

    out = Path(sys.argv[1])
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "points": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            folder = Path(tmp) / name
            build(folder, shape)
            results["points"] += measure(folder, name, shape)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
