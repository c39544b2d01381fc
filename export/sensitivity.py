"""Which weights of an int4 ONNX export to keep at 8 bits: each weight matrix's sensitivity to
int4 rounding, measured on the operator's own conversations.

Why: weight-only int4 (MatMulNBits, block 32, asymmetric, round to nearest) loses most of its
quality in a few matrices, and which ones depends on the model and the data. A fixed list (the
head, every down and v projection) cost SmolLM2 + adapter +11.2% perplexity (KL 0.118); keeping
the same bytes at 8 bits where this module says gave +2.8-4.2% (KL 0.073-0.074) at the same size
and speed (bench/results/int4-calibration-cpu.md). Measuring each matrix by quantizing it alone
and scoring the graph took ~4 s per matrix (14 min for SmolLM2's 211); this estimate costs a few
dozen forward/backward passes whatever the number of matrices, and ranked SmolLM2's like that scan
(Pearson r 0.98 on the per-matrix KL increase).

The estimate (second order; the model's Fisher information along each matrix's rounding error):
quantizing matrix W by its error E (dequantized int4 minus W) moves the model's next-token
distributions by a mean KL of about 1/2 E^T F E per scored token, F being the Fisher information
of those distributions. With labels y drawn from the model's own distribution at each scored
position, g = d log p(y)/dW has E[g g^T] = F, and the per-position terms are independent with mean
zero, so 1/2 E[<E, g>^2] over draws of a conversation is 1/2 E^T F E summed over its positions,
for every matrix from the same backward pass. Each draw is one backward pass; a matrix's score is
the mean over draws and conversations, per scored token. The 8-bit error is ~16x smaller and is
left out (under 0.5% of a score).

E comes from onnxruntime's own quantizer (`quantize_matmul_4bits`, the kernel MatMulNBitsQuantizer
calls), so it is the error the export will have. Only torch, numpy and onnxruntime; no network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 32  # export.onnx.NBITS["block_size"]


@dataclass(frozen=True)
class Conversation:
    """Token ids of a rendered conversation and the positions whose next token is scored."""

    input_ids: Sequence[int]
    positions: Sequence[int]


def dequantized(weight: np.ndarray, bits: int = 4, block: int = BLOCK) -> np.ndarray:
    """`weight` (out x in, as torch stores a Linear's) after onnxruntime's blockwise asymmetric
    round-to-nearest quantization along `in` (MatMulNBits' K), back in float32."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    cols, rows = weight.shape  # MatMul's B is weight.T: rows = K (in), cols = N (out)
    blocks = -(-rows // block)
    b = np.zeros((blocks * block, cols), np.float32)
    b[:rows] = weight.T
    scales = np.zeros((cols, blocks), np.float32)
    if bits == 4:
        packed = np.zeros((cols, blocks, block // 2), np.uint8)
        zero = np.zeros((cols, -(-blocks // 2)), np.uint8)
        quantize_matmul_4bits(packed, b, scales, zero, block, cols, blocks * block, False)
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(cols, blocks, block)
        zero = np.stack([zero & 15, zero >> 4], axis=-1).reshape(cols, -1)[:, :blocks]
    elif bits == 8:
        q = np.zeros((cols, blocks, block), np.uint8)
        zero = np.zeros((cols, blocks), np.uint8)
        quantize_matmul_8bits(q, b, scales, zero, block, cols, blocks * block, False)
    else:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    out = (q.astype(np.float32) - zero[..., None].astype(np.float32)) * scales[..., None]
    return out.reshape(cols, blocks * block)[:, :rows]


def nbits_bytes(k: int, n: int, bits: int, block: int = BLOCK) -> int:
    """Bytes of a K x N weight as MatMulNBits stores it: packed values, fp32 scales, zero points."""
    blocks = -(-k // block)
    zero_bytes = blocks if bits == 8 else -(-blocks // 2)
    return n * (blocks * block * bits // 8 + blocks * 4 + zero_bytes)


def scores(model: Any, units: Mapping[str, Any], data: Sequence[Conversation], *, draws: int,
           seed: int = 0, step: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Each unit's estimated mean KL increase per scored token when it alone is at int4.

    `model`: a transformers causal LM (eval mode, on the CPU); `units`: name -> the Linear module
    whose weight is one MatMul of the export (the output head may be tied to the input embedding:
    it is untied in `model` so that its score is the head's alone). `step` is called after each
    backward pass (progress, and the caller's cancel check)."""
    import torch

    params = _prepare(model, units)
    errors = {name: torch.from_numpy(dequantized(p.detach().float().numpy()) - p.detach().float().numpy()
                                     ).to(torch.bfloat16) for name, p in params.items()}
    sums = dict.fromkeys(params, 0.0)
    hooks = [p.register_post_accumulate_grad_hook(_accumulate(name, errors[name], sums))
             for name, p in params.items()]
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        for conversation in data:
            ids = torch.tensor([list(conversation.input_ids)])
            at = torch.tensor(list(conversation.positions))
            tokens += len(at)
            for _ in range(draws):
                logits = model(input_ids=ids).logits[0, at].float()
                log_p = torch.log_softmax(logits, dim=-1)
                drawn = torch.multinomial(log_p.detach().exp(), 1, generator=generator)
                log_p.gather(1, drawn).sum().backward()  # each matrix's hook takes its term
                step()
    finally:
        for hook in hooks:
            hook.remove()
    return {name: total / draws / 2 / max(tokens, 1) for name, total in sums.items()}


def _prepare(model: Any, units: Mapping[str, Any]) -> dict[str, Any]:
    """Gradients for the units' weights only; a head that shares the embedding's tensor gets its
    own copy, so that its gradient is not summed with the embedding lookup's."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    embedding = model.get_input_embeddings().weight
    params = {}
    for name, module in units.items():
        if module.weight is embedding:
            module.weight = torch.nn.Parameter(embedding.detach().clone())
        module.weight.requires_grad_(True)
        params[name] = module.weight
    return params


def _accumulate(name: str, error: Any, sums: dict[str, float]) -> Callable[[Any], None]:
    def hook(param: Any) -> None:
        sums[name] += float((error.float() * param.grad).sum()) ** 2
        param.grad = None  # one matrix's gradient alive at a time
    return hook


def keep_at_8_bits(sensitivity: Mapping[str, float], saved: Mapping[str, int], budget: int,
                   always: Sequence[str] = ()) -> list[str]:
    """The units kept at 8 bits: `always` first, then the most sensitive per byte that 4 bits
    would save, each that still fits in `budget` bytes (of 8-bit over 4-bit storage)."""
    keep = list(always)
    spent = sum(saved[n] for n in keep)
    for name in sorted((n for n in sensitivity if n not in keep),
                       key=lambda n: (-sensitivity[n] / max(saved[n], 1), n)):
        if spent + saved[name] <= budget:
            keep.append(name)
            spent += saved[name]
    return keep
