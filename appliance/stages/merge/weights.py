"""Merge a finished run's LoRA adapter into a full-precision copy of its base model.

The merge never touches 4-bit weights (merging into NF4 gives logits off by ~10 and a checkpoint no
converter accepts). It streams the base tensor by tensor (`appliance.tensorstream`): W' = W + s * B A
computed in fp32 for the adapted projections, everything else converted, each tensor written as soon
as it is merged, so peak memory is about one fp32 tensor and its output whatever the model's size (a
7-8B model merges on a 32 GB box). Two bases are offered:
- `full`: the base as imported (what an operator would call "the model");
- `nf4`: the base as training saw it, each adapted projection quantized to NF4 (double quant, block
  64) and dequantized again, other weights in the training compute dtype. Closer to what was
  trained; `merge_check.json` records both gaps.

The merged folder is a plain HF folder (config, tokenizer, chat template, safetensors) that the GGUF
and ONNX exporters take as input.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from appliance import tensorstream
from appliance.errors import ApplianceError, ValidationError
from appliance.modelio import check_shards
from appliance.progress import QUIET, Counter, Reporter
from appliance.stages.merge.request import BASES, DTYPES

WEIGHT_FILES = (".safetensors",)
SKIP = ("manifest.json", "gguf", "model.safetensors.index.json")


def adapter_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float, dict[str, Any]]:
    """{base weight key: (A, B)}, the scale s, and the adapter config."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "lora_bias",
                               "modules_to_save") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise ValidationError(f"{adapter_dir}: only plain LoRA adapters can be merged (peft_type="
                              f"{config.get('peft_type')}; unsupported settings: {unsupported or 'none'})")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        part = next((p for p in ("lora_A", "lora_B") if f".{p}." in key), None)
        if part is None:  # e.g. lora_embedding_A/B: never merged silently without its delta
            raise ValidationError(f"{adapter_dir}: adapter tensor {key} is not a LoRA linear weight "
                                  "this merge understands")
        module = key.split(f".{part}.")[0].removeprefix("base_model.model.")
        pairs.setdefault(f"{module}.weight", {})[part] = value
    missing = [k for k, v in pairs.items() if len(v) != 2]
    if missing:
        raise ApplianceError(f"{adapter_dir}: incomplete LoRA pairs for {missing[:3]}",
                             title="Broken adapter")
    return {k: (v["lora_A"], v["lora_B"]) for k, v in pairs.items()}, scale, config


def _out_dtype(name: str, stored: Any) -> Any:
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name == "auto":
        return stored if stored in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    return table[name]


def nf4_roundtrip(weight: Any, dtype: Any) -> Any:
    """The weight as bitsandbytes' NF4 (double quant, block 64) gives it back in `dtype`: what the
    QLoRA base layer computed with during training."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.to(dtype).contiguous(), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state).to(dtype)


def quantized_in_training(key: str, value: Any) -> bool:
    """bitsandbytes made every Linear of the decoder layers NF4 (not embeddings, norms, the head)."""
    return value.ndim == 2 and ".layers." in key and key.endswith(".weight")


def _merge_tensor(key: str, value: Any, deltas: dict[str, tuple[Any, Any]], scale: float, base: str,
                  train_dtype: Any, out_dtype: Any) -> Any:
    import torch

    if base == "nf4":
        value = nf4_roundtrip(value, train_dtype) if quantized_in_training(key, value) \
            else value.to(train_dtype)
    if key not in deltas:
        return value.to(out_dtype)
    a, b = deltas[key]
    if (b.shape[0], a.shape[1]) != tuple(value.shape):
        raise ApplianceError(f"adapter weight for {key} is {b.shape[0]}x{a.shape[1]}, the base has "
                             f"{tuple(value.shape)}", title="Adapter does not match the base")
    merged = value.to(torch.float32) + scale * (b.to(torch.float32) @ a.to(torch.float32))
    return merged.to(out_dtype)


def _first_float_dtype(shards: list[Path], dtype: str) -> Any:
    dtypes = tensorstream.torch_dtypes()
    for shard in shards:
        for entry in tensorstream.entries(shard)[0]:
            if dtypes[entry.dtype].is_floating_point:
                return _out_dtype(dtype, dtypes[entry.dtype])
    raise ValidationError(f"{shards[0].parent}: no floating-point weights to merge")


def _out_spec(entry: tensorstream.Entry, out_type: Any) -> tensorstream.Entry:
    if not tensorstream.torch_dtypes()[entry.dtype].is_floating_point:
        return tensorstream.Entry(entry.name, entry.dtype, entry.shape)
    return tensorstream.Entry(entry.name, tensorstream.dtype_name(out_type), entry.shape)


def merge_folder(base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str = "auto",
                 base: str = "full", train_dtype: str = "bf16", report: Reporter = QUIET,
                 counts: Counter | None = None) -> dict[str, Any]:
    """Write the merged HF folder into `out_dir` (which must exist, empty). Returns its summary.
    `report` gets a line per shard and is checked for a cancel before each; `counts` gets the
    tensors written of the model's total (all shards) as they are written."""
    import torch

    if dtype not in DTYPES or base not in BASES:
        raise ValidationError(f"dtype must be one of {', '.join(DTYPES)} and base one of "
                              f"{', '.join(BASES)}; got {dtype!r}, {base!r}")
    deltas, scale, adapter_config = adapter_deltas(adapter_dir)
    shards = check_shards(base_dir)
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[train_dtype]
    out_type = _first_float_dtype(shards, dtype)
    tables = [tensorstream.entries(shard)[0] for shard in shards]  # headers only: cheap
    total, written = sum(map(len, tables)), 0
    used: set[str] = set()
    for i, (shard, table) in enumerate(zip(shards, tables, strict=True), 1):
        report.check_cancel()
        specs = [_out_spec(e, out_type) for e in table]
        with tensorstream.TensorFileWriter(out_dir / shard.name, specs, {"format": "pt"}) as out:
            for key, value in tensorstream.read_tensors(shard):
                if value.is_floating_point():
                    value = _merge_tensor(key, value, deltas, scale, base, tdtype, out_type)
                out.write(key, value)
                used.add(key)
                del value
                written += 1
                if counts is not None:
                    counts(written, total)
        report.log(f"merged shard {i}/{len(shards)} ({shard.name})")
    unused = sorted(set(deltas) - used)
    if unused:
        raise ApplianceError(f"the adapter adapts weights the base does not have: {unused[:3]}",
                             title="Adapter does not match the base",
                             hint="the run was trained on another model")
    _copy_side_files(base_dir, out_dir, out_type)
    return {"adapted_weights": len(deltas), "scale": scale, "rank": adapter_config["r"],
            "dtype": str(out_type).removeprefix("torch."), "base": base, "shards": len(shards)}


def _copy_side_files(base_dir: Path, out_dir: Path, out_type: Any) -> None:
    for item in base_dir.iterdir():
        if item.name in SKIP or item.suffix in WEIGHT_FILES:
            continue
        if item.is_file():
            shutil.copy2(item, out_dir / item.name)
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        shutil.copy2(index, out_dir / index.name)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    name = str(out_type).removeprefix("torch.")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def logits_gap(merged_dir: Path, base_dir: Path, adapter_dir: Path, prompts: list[list[int]],
               *, base: str = "full", train_dtype: str = "bf16") -> dict[str, float | str]:
    """Merged model vs the adapter applied at run time on the same base, on `prompts` (token ids):
    max and mean absolute logit difference, on the CPU, in fp32 where two copies fit in memory
    (`scoring_dtype`), else bf16 (recorded as `dtype`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = scoring_dtype(merged_dir, copies=2)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype,
                                                  trust_remote_code=False).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype,
                                                     trust_remote_code=False)
    if base == "nf4":
        tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[train_dtype]
        _roundtrip_base(reference, tdtype)
    adapted = PeftModel.from_pretrained(reference, str(adapter_dir)).eval()
    worst, total, count = 0.0, 0.0, 0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            diff = (merged(input_ids=x).logits.float() - adapted(input_ids=x).logits.float()).abs()
            worst = max(worst, float(diff.max()))
            total, count = total + float(diff.sum()), count + diff.numel()
    return {"max_abs_logit_diff": worst, "mean_abs_logit_diff": total / max(count, 1),
            "prompts": len(prompts), "dtype": str(dtype).removeprefix("torch.")}


def scoring_dtype(folder: Path, copies: int = 1) -> Any:
    """fp32 when `copies` fp32 copies of the model take at most half of the memory available now,
    else bf16: the CPU scoring of a 7-8B model (28-32 GB in fp32) must still fit a 32 GB box."""
    import psutil
    import torch

    from appliance.modelio import weights_summary

    params = weights_summary(check_shards(folder))["parameters"]
    fits = copies * params * 4 <= psutil.virtual_memory().available / 2
    return torch.float32 if fits else torch.bfloat16


def _roundtrip_base(model: Any, dtype: Any) -> None:
    """Give `model` the NF4-roundtripped base weights the nf4 merge used (and the training dtype
    elsewhere, held in fp32)."""
    import torch

    with torch.no_grad():
        for key, param in model.state_dict(keep_vars=True).items():
            value = nf4_roundtrip(param.data, dtype) if quantized_in_training(key, param.data) \
                else param.data.to(dtype)
            param.data.copy_(value.to(param.dtype))
