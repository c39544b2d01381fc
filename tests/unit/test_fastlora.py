"""The fused LoRA forward/backward computes what peft's does: the same loss and the same adapter
gradients through a whole model (NF4 base through bitsandbytes, and a plain bf16 base), on the tiny
Llama and on the tiny Qwen2 (attention biases)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from peft import LoraConfig, get_peft_model  # noqa: E402

from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.fastlora import fuse  # noqa: E402
from appliance.stages.train.recipe import causal_lm_loss, load_model  # noqa: E402
from tests.conftest import randomize_lora_b  # noqa: E402


def _loss_and_grads(folder: Path, fused: bool, quantization: str) -> tuple[float, dict]:
    cfg = validate({"fused_lora": fused, "quantization": quantization, "lora_dropout": 0.0,
                    "lora_r": 8, "lora_alpha": 16, "seed": 5})
    model = load_model(folder, cfg, "cpu", torch.bfloat16)
    randomize_lora_b(model)
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


def check_fused_dropout_against_formula(device: str,
                                        mask: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """The fused layer's forward and backward (each block's mask drawn again from the seed)
    against autograd through y = x W^T + b + s (x * mask) A^T B^T, where `mask(block, salt)` is
    the mask (0 or 1 / (1 - p)) the fused layer draws for that block. Four blocks of 4 tokens
    (the caller sets fastlora.DROP_ROWS = 4) and the seed."""
    from appliance.stages.train import fastlora

    torch.manual_seed(0)
    peft_model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 16)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.3))
    layer = peft_model.to(device).base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 0.1)
    w, bias = layer.get_base_layer().weight.detach(), layer.get_base_layer().bias.detach()
    x = torch.randn(3, 5, 24, device=device)
    scale = float(layer.scaling["default"])
    out = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        a.grad = b.grad = None
        if fused:
            y = fastlora.LoRALinear.apply(xi, xi, a, b, layer, scale, (0.3, 3))
        else:
            x2 = xi.reshape(-1, 24)
            masks = [mask(x2[s:e], 3 * fastlora.SALT_BLOCKS + i) for i, s, e in fastlora.row_blocks(15)]
            y = xi @ w.t() + bias + ((x2 * torch.cat(masks)).view(3, 5, 24) @ a.t()) @ b.t() * scale
        (y * torch.linspace(-1, 1, 16, device=device)).sum().backward()
        out.append((y.detach(), xi.grad, a.grad.clone(), b.grad.clone()))
    for got, ref in zip(out[0], out[1], strict=True):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_seeded_dropout_gives_the_gradients_of_its_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the fused layer makes LoRA dropout itself and keeps only x for backward, drawing
    the mask again from its seed (fastlora.dropped). The function is device-agnostic: checked
    here on the CPU against autograd through the explicit formula, with the same mask."""
    from appliance.stages.train import fastlora

    monkeypatch.setattr(fastlora, "DROP_ROWS", 4)  # 15 tokens: four blocks, four masks
    fastlora.set_dropout_seed("cpu", 1234)
    check_fused_dropout_against_formula(
        "cpu", lambda block, salt: fastlora.dropped(torch.ones_like(block), 0.3, salt))
    kept = fastlora.dropped(torch.ones(2000), 0.3, 7)
    assert torch.equal(kept, fastlora.dropped(torch.ones(2000), 0.3, 7))  # the seed fixes the mask
    assert not torch.equal(kept, fastlora.dropped(torch.ones(2000), 0.3, 8))  # a salt its own
    assert 0.6 < float((kept > 0).float().mean()) < 0.8 and float(kept.max()) == pytest.approx(1 / 0.7)


def _dropout_grads(folder: Path, checkpointing: bool, dropout: float, stash_rng: bool = True) -> dict:
    cfg = validate({"quantization": "none", "lora_dropout": dropout, "lora_r": 8, "lora_alpha": 16,
                    "seed": 5, "gradient_checkpointing": checkpointing})
    model = load_model(folder, cfg, "cpu", torch.float32)
    if not stash_rng:  # as under CUDA graphs: the recompute finds the generator where it is
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
    randomize_lora_b(model)
    model.train()
    ids = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # as the training loop seeds each step
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    total, n = causal_lm_loss(model, inputs)
    (total / n).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_seeded_dropout_survives_checkpointing_and_repeats(tiny_llama_source: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The path CUDA takes, run on the CPU: the forward's seed is drawn from the CPU generator
    into a tensor the recompute reads again, so gradient checkpointing draws the same masks (the
    gradients equal those without checkpointing), and the same step seed gives the same
    gradients (resume)."""
    from appliance.stages.train import fastlora

    monkeypatch.setattr(fastlora, "SEEDED_DEVICES", ("cuda", "cpu"))
    plain = _dropout_grads(tiny_llama_source, False, 0.2)
    again = _dropout_grads(tiny_llama_source, False, 0.2)
    recomputed = _dropout_grads(tiny_llama_source, True, 0.2)
    unstashed = _dropout_grads(tiny_llama_source, True, 0.2, stash_rng=False)
    undropped = _dropout_grads(tiny_llama_source, False, 0.0)
    for name in plain:
        assert torch.equal(plain[name], again[name]), name
        for other in (recomputed, unstashed):
            err = float((other[name] - plain[name]).norm() / plain[name].norm())
            assert err < 1e-5, (name, err)
    assert any(not torch.allclose(plain[n], undropped[n], rtol=1e-3) for n in plain)  # dropout acted
