"""The int4 layout's pieces (export.sensitivity): the rounding error is the one onnxruntime's
MatMulNBits will have, the byte counts are its storage, the layout spends a budget by sensitivity
per byte, and the Fisher estimate tracks the KL that quantizing a matrix really costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import onnx as onnx_export
from export import sensitivity
from export.sensitivity import Conversation, dequantized, keep_at_8_bits, nbits_bytes


def _matmul_graph(weight: np.ndarray) -> Any:
    """x (M x K) @ B, B = weight.T (K x N) constant: one MatMul, as optimum exports a Linear."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape[1], weight.shape[0]
    node = helper.make_node("MatMul", ["x", "B"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              [numpy_helper.from_array(np.ascontiguousarray(weight.T), "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 40])  # 40: a last block padded, as MatMulNBits pads it
def test_the_error_is_the_one_the_export_s_matmulnbits_computes_with(bits: int, k: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((24, k)) * 0.05).astype(np.float32)
    model = onnx_export._nbits(_matmul_graph(weight), bits=bits)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # identity rows: the graph's output is its dequantized weight (exact in int8 activations too)
    (out,) = session.run(None, {"x": np.eye(k, dtype=np.float32)})
    ours = dequantized(weight, bits)
    np.testing.assert_allclose(ours, out.T, rtol=1e-5, atol=1e-6)
    step = np.abs(weight).max() / (8 if bits == 4 else 128)
    assert 0 < np.abs(ours - weight).max() <= step  # quantized, by at most about one step
    assert weight.size * bits // 8 < nbits_bytes(k, 24, bits) < weight.nbytes
    stored = sum(len(t.raw_data) for t in model.graph.initializer)
    assert stored == nbits_bytes(k, 24, bits)


def test_a_weight_already_on_the_int4_grid_has_no_error() -> None:
    weight = dequantized((np.random.default_rng(1).standard_normal((8, 64)) * 0.05).astype(np.float32))
    np.testing.assert_allclose(dequantized(weight), weight, atol=1e-7)


def test_the_layout_spends_the_budget_on_sensitivity_per_byte() -> None:
    scores = {"head": 0.001, "big": 0.009, "small": 0.004, "tiny": 0.00005, "mid": 0.002}
    saved = {"head": 50, "big": 90, "small": 10, "tiny": 1, "mid": 30}
    # per byte: small 4e-4, big 1e-4, mid 6.7e-5, tiny 5e-5, head 2e-5 (but always kept, first);
    # one that no longer fits is passed over for smaller ones that still do
    assert keep_at_8_bits(scores, saved, budget=100, always=["head"]) == ["head", "small", "mid", "tiny"]
    assert keep_at_8_bits(scores, saved, budget=160, always=["head"]) == ["head", "small", "big", "tiny"]
    assert keep_at_8_bits(scores, saved, budget=0) == []


def _kl_when_quantized(model: Any, module: Any, data: list[Conversation]) -> float:
    """The mean KL per scored token of the model's distributions when `module` alone is int4."""
    import torch

    def log_probs() -> list[Any]:
        with torch.no_grad():
            logits = [model(input_ids=torch.tensor([c.input_ids])).logits[0, list(c.positions)] for c in data]
            return [torch.log_softmax(x, -1) for x in logits]

    ref = log_probs()
    saved = module.weight.data.clone()
    module.weight.data = torch.from_numpy(dequantized(saved.numpy()))
    got = log_probs()
    module.weight.data = saved
    kl = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(ref, got, strict=True))
    return kl / sum(len(c.positions) for c in data)


def test_the_estimate_tracks_the_kl_that_quantizing_a_matrix_costs(tiny_llama_source: Path) -> None:
    """On a tiny random Llama: each matrix's estimate within 2x of the KL measured by quantizing it
    alone (those that matter: KL over 1e-7; attention's q/k barely move a random model's outputs),
    and the head, tied to the embedding, scored alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_source), dtype=torch.float32).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied, to measure
    g = torch.Generator().manual_seed(1)
    data = [Conversation(torch.randint(0, 49152, (48,), generator=g).tolist(), list(range(8, 47)))
            for _ in range(2)]
    units = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    measured = {n: _kl_when_quantized(model, m, data) for n, m in units.items()}
    tied = AutoModelForCausalLM.from_pretrained(str(tiny_llama_source), dtype=torch.float32).eval()
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    passes: list[int] = []
    estimate = sensitivity.scores(tied, {n: m for n, m in tied.named_modules() if n in units}, data,
                                  draws=16, step=lambda: passes.append(1))
    assert len(passes) == 2 * 16 and set(estimate) == set(units)
    assert tied.get_input_embeddings().weight.requires_grad is False  # the head got its own copy
    big = [n for n in units if measured[n] > 1e-7]
    assert "lm_head" in big and len(big) >= 8
    for name in big:
        assert 0.5 < estimate[name] / measured[name] < 2, (name, estimate[name], measured[name])
    assert max(estimate, key=lambda n: estimate[n]) == max(measured, key=lambda n: measured[n]) == "lm_head"
