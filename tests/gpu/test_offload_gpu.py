"""Activation offload (train/offload.py) on a real GPU: a QLoRA step with the checkpointed layer
inputs in host memory gives the loss and adapter gradients of the plain step, with LoRA dropout
on, and peaks lower by about those inputs; the same inside a CUDA graph (cuda_graphs: the copies
captured, replayed). Skipped without CUDA:
`python -m pytest tests/gpu/test_offload_gpu.py -s`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none found)", allow_module_level=True)

from appliance.stages.train import graphed, offload  # noqa: E402
from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.recipe import causal_lm_loss, head_chunk, load_model  # noqa: E402
from tests.conftest import build_random_llama, randomize_lora_b  # noqa: E402

pytestmark = pytest.mark.gpu
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
         "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096}
BATCH, SEQ = 4, 2048


def _step(folder: Path, offloaded: bool, graphs: bool = False) -> tuple[float, dict[str, Any], float]:
    cfg = validate({"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "seed": 4,
                    "offload_activations": offloaded, "cuda_graphs": "on" if graphs else "off"})
    model = load_model(folder, cfg, "cuda", torch.bfloat16).train()
    randomize_lora_b(model)
    ids = torch.randint(3, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(9)).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.manual_seed(21)
    steps = None
    if graphs:  # warm-up, capture and one replay: the peak covers all three
        steps = graphed.Steps(model, BATCH, 0, head_chunk(model))
        # every position but the first is a label: the weight is the eager step's 1 / count
        total, count = steps(ids, ids, 1.0 / (BATCH * (SEQ - 1)))
    else:
        total, count = causal_lm_loss(model, {"input_ids": ids, "labels": ids,
                                              "attention_mask": torch.ones_like(ids)})
        (total / count).backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    del model, steps
    torch.cuda.empty_cache()
    return float(total.detach() / count), grads, peak


def test_offload_trains_the_same_in_less_memory(tmp_path: Path) -> None:
    folder = build_random_llama(tmp_path / "m", **SHAPE)
    _step(folder, True)  # warm-up: one-time allocations (cuBLAS workspaces, kernels) land here
    loss_plain, grads_plain, peak_plain = _step(folder, False)
    loss_off, grads_off, peak_off = _step(folder, True)
    inputs_mib = SHAPE["num_hidden_layers"] * BATCH * SEQ * SHAPE["hidden_size"] * 2 / 2**20
    print(f"\npeak above the weights: plain {peak_plain:.0f} MiB, offloaded {peak_off:.0f} MiB "
          f"(checkpointed inputs {inputs_mib:.0f} MiB); loss {loss_plain:.6f} vs {loss_off:.6f}")
    assert loss_off == pytest.approx(loss_plain, rel=1e-4)
    worst = max(float((grads_off[n] - g).norm() / g.norm()) for n, g in grads_plain.items())
    print(f"worst adapter-gradient relative difference {worst:.2e} over {len(grads_plain)} tensors")
    assert worst < 1e-2
    assert peak_plain - peak_off > 0.6 * inputs_mib


def test_offload_inside_a_cuda_graph_trains_the_same_in_less_memory(tmp_path: Path) -> None:
    """The graphed step (graphed.Steps: warm-up, capture, replay) with the layer inputs offloaded
    against the graphed step keeping them: the same loss and gradients (the same seeded masks),
    a peak lower by most of the inputs (the copies are in the graph, and torch's deferred frees of
    cross-stream tensors during a capture did not keep the inputs on the GPU)."""
    pytest.importorskip("triton")
    folder = build_random_llama(tmp_path / "m", **SHAPE)
    _step(folder, True, graphs=True)  # warm-up of the process: one-time allocations land here
    loss_kept, grads_kept, peak_kept = _step(folder, False, graphs=True)
    loss_off, grads_off, peak_off = _step(folder, True, graphs=True)
    assert offload.ARENA.captured
    inputs_mib = SHAPE["num_hidden_layers"] * BATCH * SEQ * SHAPE["hidden_size"] * 2 / 2**20
    worst = max(float((grads_off[n] - g).norm() / g.norm()) for n, g in grads_kept.items())
    print(f"\ngraphed, peak above the weights: kept {peak_kept:.0f} MiB, offloaded {peak_off:.0f} MiB "
          f"(checkpointed inputs {inputs_mib:.0f} MiB); loss {loss_kept:.6f} vs {loss_off:.6f}; "
          f"worst adapter-gradient relative difference {worst:.2e}")
    assert loss_off == pytest.approx(loss_kept, rel=1e-4)
    assert worst < 1e-2
    assert peak_kept - peak_off > 0.6 * inputs_mib
