"""The fused LoRA forward/backward computes what peft's does: the same loss and the same adapter
gradients through a whole model (NF4 base through bitsandbytes, and a plain bf16 base), on the tiny
Llama and on the tiny Qwen2 (attention biases)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from peft import LoraConfig, get_peft_model  # noqa: E402

from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.fastlora import fuse  # noqa: E402
from appliance.stages.train.recipe import causal_lm_loss, load_model  # noqa: E402


def _loss_and_grads(folder: Path, fused: bool, quantization: str) -> tuple[float, dict]:
    cfg = validate({"fused_lora": fused, "quantization": quantization, "lora_dropout": 0.0,
                    "lora_r": 8, "lora_alpha": 16, "seed": 5})
    model = load_model(folder, cfg, "cpu", torch.bfloat16)
    with torch.no_grad():  # B starts at zero: give the adapters something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    ids = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(7))
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    total, n = causal_lm_loss(model, inputs)
    (total / n).backward()
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(total / n), grads


@pytest.mark.parametrize("quantization", ["nf4", "none"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_lora_matches_peft(family: str, quantization: str, tiny_llama_source: Path,
                                 tiny_qwen2_source: Path) -> None:
    folder = tiny_llama_source if family == "llama" else tiny_qwen2_source
    ref_loss, ref = _loss_and_grads(folder, False, quantization)
    loss, got = _loss_and_grads(folder, True, quantization)
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert set(got) == set(ref) and len(ref) > 10
    for name in ref:
        err = float((got[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12))
        assert err < 5e-2, (name, err)


def test_layers_peft_does_differently_keep_peft_forward() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"], use_dora=True))
    assert fuse(peft_model) == 0
    plain = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)),
                           LoraConfig(r=4, target_modules=["0"]))
    assert fuse(plain) == 1 and fuse(plain) == 0  # idempotent
