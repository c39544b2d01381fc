"""Liger's fused RMSNorm, RoPE and SwiGLU (train/kernels.py) on a real GPU: the loss and the adapter
gradients of a QLoRA step with them equal those with transformers' own modules, on a Llama and a
Qwen2 (biases in attention), with gradient checkpointing as the product trains. Skipped without
CUDA or without liger-kernel (CI has neither): `python -m pytest tests/gpu/test_kernels_gpu.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none found)", allow_module_level=True)
pytest.importorskip("liger_kernel", reason="needs liger-kernel (set-up installs it on CUDA boxes)")

from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.recipe import causal_lm_loss, load_model  # noqa: E402
from tests.conftest import build_random_llama, build_random_qwen2  # noqa: E402

pytestmark = pytest.mark.gpu
SHAPE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def _step(folder: Path, fused: str) -> tuple[float, dict[str, Any], str]:
    cfg = validate({"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "seed": 4,
                    "fused_kernels": fused})
    model = load_model(folder, cfg, "cuda", torch.bfloat16).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(3, 49152, (2, 256), generator=torch.Generator().manual_seed(9)).cuda()
    labels = ids.clone()
    labels[:, :40] = -100
    total, count = causal_lm_loss(model, {"input_ids": ids, "labels": labels,
                                          "attention_mask": torch.ones_like(ids)})
    (total / count).backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return float(total / count), grads, model.appliance_kernels


@pytest.mark.parametrize("build", [build_random_llama, build_random_qwen2], ids=["llama", "qwen2"])
def test_fused_kernels_train_as_the_plain_modules(tmp_path: Path, build: Any) -> None:
    folder = build(tmp_path / "m", **SHAPE)
    loss_plain, grads_plain, line_plain = _step(folder, "off")
    loss_fused, grads_fused, line_fused = _step(folder, "auto")
    print(f"\n{line_fused}\nloss plain {loss_plain:.6f} fused {loss_fused:.6f}")
    assert line_plain.startswith("fused kernels off") and "RMSNorm x9, SwiGLU x4, RoPE" in line_fused
    assert loss_fused == pytest.approx(loss_plain, rel=2e-3)  # bf16: the fused kernels round once
    worst = 1.0
    for name, g in grads_plain.items():
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), grads_fused[name].flatten(), dim=0))
        worst = min(worst, cos)
    print(f"worst adapter-gradient cosine {worst:.5f} over {len(grads_plain)} tensors")
    assert worst > 0.99
