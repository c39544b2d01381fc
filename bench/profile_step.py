"""Where a training step of our engine spends its GPU time: torch.profiler over two steps of the
Qwen2.5-7B shape (batch 1 x 2048) after three warm-up steps, kernels grouped by name.

Usage (GPU host): python bench/profile_step.py [--shape qwen7b] [--engine ours|unsloth|graphed] [--out DIR]
Prints the step time, the top kernels by total CUDA time and each group's share of the step.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.train_throughput import SHAPES, build, make_step, unsloth_first

GROUPS = [("dequantize (bnb NF4)", r"dequant|kDequantize"),
          ("matmul fp32 (LoRA)", r"f32f32|sgemm"),
          ("matmul bf16", r"gemm|nvjet|cutlass|sm90_xmma"),
          ("attention (flash/sdpa)", r"flash|fmha|attention|sdpa"),
          ("cross-entropy / softmax", r"softmax|SoftMax|nll|cross"),
          ("copy / cast", r"copy|Copy|cast|to_copy|Memcpy"),
          ("elementwise / reduce", r"elementwise|reduce|vectorized"),
          ("optimizer", r"optim|Optimizer|adam|Adam")]


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen7b")
    parser.add_argument("--engine", default="ours", help="a bench/train_throughput.py engine")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    _, batch, seq = SHAPES[args.shape]
    unsloth_first(args.engine)
    step = make_step(args.engine, build(args.shape), args.shape)
    x = torch.randint(0, SHAPES[args.shape][0]["vocab_size"], (batch, seq), device="cuda")
    for _ in range(3):
        step(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step(x)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / 5
    print(f"{args.shape} {args.engine}: {per_step * 1000:.1f} ms/step, {batch * seq / per_step:.0f} tokens/s")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(x)
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                      "cudaLaunchKernelExC"))
    cpu_ops = sorted(((e.self_cpu_time_total / 2 / 1000, e.count // 2, e.key) for e in prof.key_averages()),
                     reverse=True)[:25]
    kernels: dict[str, float] = defaultdict(float)
    timed = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0)]
    # kernels only (an op's device time is its kernels' again), where the profiler says which
    only = [e for e in timed if str(getattr(e, "device_type", "")).endswith("CUDA")] or timed
    for e in only:
        kernels[e.key] += e.self_device_time_total / 2 / 1000  # ms per step
    total = sum(kernels.values())
    lines = [f"GPU busy {total:.1f} ms of {per_step * 1000:.1f} ms per step; {launches // 2} kernel "
             "launches per step"]
    groups: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        group = next((g for g, pat in GROUPS if re.search(pat, name)), "other")
        groups[group] += ms
    lines += [f"  {g:28} {ms:8.1f} ms  {ms / per_step / 10:5.1f}%" for g, ms in
              sorted(groups.items(), key=lambda kv: -kv[1])]
    lines.append("top kernels:")
    lines += [f"  {ms:8.2f} ms  {name[:150]}" for name, ms in
              sorted(kernels.items(), key=lambda kv: -kv[1])[:30]]
    lines.append("top host (CPU) time, self, per step:")
    lines += [f"  {ms:8.2f} ms  x{count:<6} {name[:100]}" for ms, count, name in cpu_ops]
    text = "\n".join(lines)
    print(text)
    Path(args.out, f"profile-{args.shape}-{args.engine}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
