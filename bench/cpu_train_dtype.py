"""CPU training step of the demo's recipe in bf16 vs fp32: step time and tokens/s side by side.

The demo's run (recipe smollm2-cpu: NF4 base, LoRA r=8, batch 4 x max_seq_len 384, gradient
checkpointing, the fused LoRA path) on the embedded SmolLM2-135M-Instruct and the Dolly sample, a
training step exactly as `appliance.stages.train.recipe.Trainer._step` runs it with grad_accum 1
(loss, backward, clip, AdamW). Each dtype gets a freshly loaded model and the same batches (the
first ones of epoch 0): `--warmup` untimed steps, then `--steps` timed ones; the table gives the
median step time and the median tokens/s, with the CPU's model name and bf16 flags, what
`compute_dtype = "auto"` picks here, and the versions. `--eval` also times one evaluation pass
over the eval split (the demo runs three); `--profile` prints torch.profiler's top operators for
one more step of each dtype; `--set key=value` changes the recipe (e.g. gradient_checkpointing=false).

Usage: python bench/cpu_train_dtype.py [--home DIR] [--dtypes bf16,fp32] [--steps 3] [--threads 2]
The workspace (default /tmp/cpu-train-dtype-ws) gets the default model and the Dolly sample when
it lacks them (`appliance models import --default`, then the dataset import).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance import cpus, demo, stack
from appliance.stages.train import config as trainconfig
from appliance.workspace import ArtifactRecord, Workspace


def inputs(home: Path) -> tuple[ArtifactRecord, ArtifactRecord]:
    from appliance.errors import NotFoundError
    from appliance.stages.datasets import importer as datasets
    from appliance.stages.models import importer as models

    ws = Workspace(home)
    try:
        model = ws.get("model", stack.DEFAULT_MODEL_NAME)
    except NotFoundError:
        model = models.import_default(ws, say=lambda m: print("  " + m, file=sys.stderr))
    try:
        data = ws.get("dataset", demo.DATASET_NAME)
    except NotFoundError:
        data, _ = datasets.import_file(ws, demo.sample_dataset(), model, name=demo.DATASET_NAME)
    return model, data


def examples(model: ArtifactRecord, data: ArtifactRecord,
             cfg: trainconfig.TrainConfig) -> tuple[list, list, int]:
    from appliance import manifest
    from appliance.hfmodel import load_tokenizer
    from appliance.stages.datasets import importer as datasets
    from appliance.stages.train.recipe import encode

    tokenizer = load_tokenizer(model.path)
    info = manifest.read(model.path)["info"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else info["stop_token_ids"][0]
    train, _ = encode(tokenizer, datasets.load_rows(data, "train"), info["stop_tokens"], cfg.max_seq_len)
    evals, _ = encode(tokenizer, datasets.load_rows(data, "eval"), info["stop_tokens"], cfg.max_seq_len)
    return train, evals, pad


def run_dtype(name: str, model: ArtifactRecord, cfg: trainconfig.TrainConfig, train: list, evals: list,
              pad: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from appliance.stages.train import fastlora
    from appliance.stages.train.recipe import (
        causal_lm_loss,
        collate,
        epoch_batches,
        evaluate,
        load_model,
        make_optimizer,
    )

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    t0 = time.monotonic()
    peft_model = load_model(model.path, cfg, "cpu", dtype)
    load_s = time.monotonic() - t0
    optimizer = make_optimizer(peft_model, cfg, "cpu")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    order = epoch_batches([len(e.input_ids) for e in train], cfg.batch_size, cfg.seed, 0)
    peft_model.train()

    def step(i: int) -> tuple[float, int, float]:
        batch = collate([train[j] for j in order[i]], pad)
        started = time.monotonic()
        loss_sum, n = causal_lm_loss(peft_model, batch)
        (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fastlora.weights_changed()
        return time.monotonic() - started, int(batch["attention_mask"].sum()), float(loss_sum) / max(n, 1)

    for i in range(args.warmup):
        step(i)
    timed = [step(args.warmup + i) for i in range(args.steps)]
    out: dict[str, Any] = {
        "dtype": name, "load_s": load_s,
        "step_s": statistics.median(t for t, _, _ in timed),
        "tok_s": statistics.median(n / t for t, n, _ in timed),
        "tokens": [n for _, n, _ in timed], "losses": [round(loss, 4) for _, _, loss in timed]}
    if args.eval:
        started = time.monotonic()
        out["eval_loss"] = evaluate(peft_model, evals, cfg, pad, "cpu")
        out["eval_s"] = time.monotonic() - started
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(args.warmup + args.steps)
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/cpu-train-dtype-ws"))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per dtype (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", action="store_true", help="also time one pass over the eval split")
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of one step")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    values, _ = trainconfig.load_recipe(demo.RECIPE)
    values.update(trainconfig.parse_override(s) for s in args.set)
    cfg = trainconfig.validate(values)
    model, data = inputs(args.home)
    train, evals, pad = examples(model, data, cfg)
    cpu = cpus.read_cpu()
    _, why = trainconfig.resolve_compute_dtype(trainconfig.validate({**values, "compute_dtype": "auto"}),
                                                  None, cpu)
    relevant = sorted(f for f in cpu.flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                     "amx_tile", "avx512_fp16", "avx_vnni"))
    print(f"CPU: {cpu.model} ({platform.machine()}), {args.threads} thread(s); flags: "
          f"{' '.join(relevant) or '(none of avx2/avx512f/avx512_bf16/amx_bf16)'}"
          f"{'; ' + cpu.problem if cpu.problem else ''}")
    print(f"torch {torch.__version__} (capability {torch.backends.cpu.get_cpu_capability()}), "
          f"transformers {transformers.__version__}, python {platform.python_version()}")
    print(f"auto picks: {why}")
    changed = {k: v for k, v in values.items() if k in dict(trainconfig.parse_override(s) for s in args.set)}
    print(f"recipe {demo.RECIPE} ({cfg.quantization}, batch {cfg.batch_size} x max_seq_len "
          f"{cfg.max_seq_len}, gradient_checkpointing={cfg.gradient_checkpointing}, fused_lora="
          f"{cfg.fused_lora}){' with ' + str(changed) if changed else ''}; {args.warmup} warm-up + "
          f"{args.steps} timed steps per dtype")
    rows = [run_dtype(name, model, cfg, train, evals, pad, args) for name in args.dtypes.split(",")]
    print()
    print("| dtype | median step s | median tokens/s | tokens per timed step | losses | load s"
          + (" | eval pass s (eval loss)" if args.eval else "") + " |")
    print("| --- | --- | --- | --- | --- | ---" + (" | ---" if args.eval else "") + " |")
    for r in rows:
        extra = f" | {r['eval_s']:.1f} ({r['eval_loss']:.4f})" if args.eval else ""
        print(f"| {r['dtype']} | {r['step_s']:.2f} | {r['tok_s']:.1f} | {r['tokens']} | {r['losses']} "
              f"| {r['load_s']:.1f}{extra} |")
    if len(rows) == 2:
        ratio = rows[0]["step_s"] / rows[1]["step_s"]
        print(f"\n{rows[0]['dtype']} / {rows[1]['dtype']} step time: {ratio:.2f}x")
    for r in rows:
        if "profile" in r:
            print(f"\n## torch.profiler, one step, {r['dtype']}\n```\n{r['profile']}```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
