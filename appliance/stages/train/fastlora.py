"""One autograd function per LoRA layer: y = x W^T + s (drop(x) A^T) B^T, in the compute dtype.

peft's LoRA forward on a 4-bit layer runs the base layer, clones its output, casts the input to
fp32 (the adapter's dtype), runs two fp32 matmuls, scales, casts back and adds: five full-size
passes over the activations and two fp32 (non tensor-core) matmuls per projection. Profiled on an
H100 (bench/profile_step.py, Qwen2.5-7B shape) those extra passes and the Python work around them
left the GPU idle or copying for more than half of each step.

Here the base weight is dequantized once per pass, the adapter's small matrices are cast to the
compute dtype (its fp32 weights stay the master copy and receive fp32 gradients), the scale is
folded into B, and the backward pass is written out: grad_x = g W + (g sB) A, grad_B = s g^T (xA^T),
grad_A = (g sB)^T drop(x). The same function, the same parameters (peft saves and loads them as
before), a fraction of the memory traffic. Layers this does not cover (merged, disabled, several
adapters, DoRA) keep peft's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def base_weight(layer: Any, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight [out, in] in `dtype`: dequantized when it is 4-bit. Calls the
    bitsandbytes ops directly (its Python wrapper costs more host time than the kernels take on a
    GPU) and uses the unpacked block scales when `unpack_scales` made them."""
    weight = layer.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        return weight.to(dtype)
    absmax = getattr(weight, "_absmax32", None)
    if absmax is None:
        absmax = _absmax(qs)
    w = torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax, qs.blocksize, qs.quant_type,
                                                       qs.shape, qs.dtype)
    return w if w.dtype == dtype else w.to(dtype)


def _absmax(qs: Any) -> torch.Tensor:
    """A 4-bit weight's fp32 block scales (double quantization stores them in 8 bits)."""
    if not qs.nested:
        return qs.absmax
    absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
        qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32)
    absmax += qs.offset
    return absmax


def unpack_scales(model: Any) -> int:
    """Keep every double-quantized 4-bit weight's block scales unpacked in fp32 (4 bytes per 64
    weights, about 0.06 bytes per parameter): two kernel launches fewer for every dequantization,
    of which a training step does three per layer. Returns the bytes added."""
    added = 0
    for module in model.modules():
        weight: Any = getattr(module, "weight", None)  # a bitsandbytes Params4bit when qs is set
        qs = getattr(weight, "quant_state", None)
        if qs is not None and qs.nested and getattr(weight, "_absmax32", None) is None:
            with torch.no_grad():
                weight._absmax32 = _absmax(qs)
            added += weight._absmax32.numel() * 4
    return added


_generation = 0


def weights_changed() -> None:
    """Call after the adapter weights change (an optimizer step, a checkpoint load): the cached
    compute-dtype copies are made again on next use. In-place updates that bump a tensor's version
    counter are noticed anyway; this covers kernels that write through a raw pointer."""
    global _generation
    _generation += 1


def _compute_copies(layer: Any, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A and s*B in the compute dtype, made once per weight update instead of in every forward,
    recompute and backward pass (a step runs each layer's adapter three times). Kept on the layer."""
    key = (_generation, a._version, b._version, a.data_ptr(), b.data_ptr(), dtype, scale)
    cached = layer.__dict__.get("_fused_copies")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, a.to(dtype), (b * scale).to(dtype))
        layer.__dict__["_fused_copies"] = cached
    return cached[1], cached[2]


class LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                layer: Any, scale: float) -> torch.Tensor:
        dtype, base = x.dtype, layer.get_base_layer()
        w = base_weight(base, dtype)
        la, lb = _compute_copies(layer, a, b, scale, dtype)
        xa = xd @ la.t()
        y = torch.addmm((x @ w.t()).flatten(0, -2), xa.flatten(0, -2), lb.t()).view(*x.shape[:-1], -1)
        if base.bias is not None:
            y = y + base.bias.to(dtype)
        ctx.save_for_backward(xd, xa, a, b)
        ctx.layer, ctx.scale = layer, scale
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        xd, xa, a, b = ctx.saved_tensors
        dtype = g.dtype
        la, lb = _compute_copies(ctx.layer, a, b, ctx.scale, dtype)
        g2 = g.flatten(0, -2)
        gb = g2 @ lb                                        # [tokens, r]
        grad_x = grad_xd = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ base_weight(ctx.layer.get_base_layer(), dtype)).view(*g.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            grad_xd = (gb @ la).view(*g.shape[:-1], -1)
        if ctx.needs_input_grad[2]:
            grad_a = (gb.t() @ xd.flatten(0, -2)).to(a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (g2.t() @ xa.flatten(0, -2)).to(b.dtype) * ctx.scale
        return grad_x, grad_xd, grad_a, grad_b, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
            or active[0] in self.lora_variant or active[0] not in self.lora_A):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    xd = self.lora_dropout[name](x)
    return LoRALinear.apply(x, xd, self.lora_A[name].weight, self.lora_B[name].weight,
                            self, float(self.scaling[name]))


def fuse(model: Any) -> int:
    """Give every plain LoRA linear layer of a peft model the fused forward; returns how many."""
    from peft.tuners.lora.layer import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear) \
                and not module.lora_variant and "_peft_forward" not in module.__dict__:
            layer: Any = module  # an nn.Module too (LoraLayer is peft's mixin): patched per instance
            layer._peft_forward = layer.forward
            layer.forward = types.MethodType(_fused_forward, layer)
            count += 1
    return count
