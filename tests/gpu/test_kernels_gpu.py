"""Liger's fused RMSNorm, RoPE and SwiGLU (train/kernels.py) on a real GPU: the loss and the adapter
gradients of a QLoRA step with them equal those with transformers' own modules, on a Llama, a
Qwen2 (biases in attention) and a Qwen3 (q/k norms before RoPE), in bf16 and in fp16 (a T4's
dtype), with gradient checkpointing as the product trains. Skipped without
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
from tests.conftest import build_random_llama, build_random_qwen2, randomize_lora_b  # noqa: E402

pytestmark = pytest.mark.gpu
SHAPE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024}


def build_random_qwen3(folder: Path, **shape: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.conftest import TOKENIZER_DIR, TOKENIZER_FILES

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, head_dim=32, **shape)
    Qwen3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        (folder / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    return folder


def _step(folder: Path, fused: str, dtype: Any) -> tuple[float, dict[str, Any], str]:
    cfg = validate({"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "seed": 4,
                    "fused_kernels": fused})
    model = load_model(folder, cfg, "cuda", dtype).train()
    randomize_lora_b(model)
    ids = torch.randint(3, 49152, (2, 256), generator=torch.Generator().manual_seed(9)).cuda()
    labels = ids.clone()
    labels[:, :40] = -100
    total, count = causal_lm_loss(model, {"input_ids": ids, "labels": labels,
                                          "attention_mask": torch.ones_like(ids)})
    (total / count).backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return float(total / count), grads, model.appliance_kernels


@pytest.mark.parametrize(("build", "dtype"), [(build_random_llama, "bf16"), (build_random_qwen2, "bf16"),
                                              (build_random_qwen3, "bf16"), (build_random_llama, "fp16")],
                         ids=["llama-bf16", "qwen2-bf16", "qwen3-bf16", "llama-fp16"])
def test_fused_kernels_train_as_the_plain_modules(tmp_path: Path, build: Any, dtype: str) -> None:
    folder = build(tmp_path / "m", **SHAPE)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    loss_plain, grads_plain, line_plain = _step(folder, "off", torch_dtype)
    loss_fused, grads_fused, line_fused = _step(folder, "auto", torch_dtype)
    print(f"\n{line_fused}\nloss plain {loss_plain:.6f} fused {loss_fused:.6f}")
    norms = 9 + (8 if build is build_random_qwen3 else 0)  # 2 per layer + the final; Qwen3: q/k norms
    assert line_plain.startswith("fused kernels off") and f"RMSNorm x{norms}, SwiGLU x4, RoPE" in line_fused
    assert loss_fused == pytest.approx(loss_plain, rel=2e-3)  # the fused kernels round once
    worst_cos, worst_rel = 1.0, 0.0
    for name, g in grads_plain.items():
        f = grads_fused[name]
        cos = torch.nn.functional.cosine_similarity(g.flatten(), f.flatten(), dim=0)
        worst_cos = min(worst_cos, float(cos))
        worst_rel = max(worst_rel, float((f - g).norm() / g.norm()))
    print(f"adapter gradients over {len(grads_plain)} tensors: worst cosine {worst_cos:.5f}, "
          f"worst relative difference {worst_rel:.4f}")
    assert worst_cos > 0.99 and worst_rel < 0.1  # a gradient scaled wrong fails the second
