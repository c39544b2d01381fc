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


_generators: dict[str, torch.Generator] = {}
_seeds: dict[str, torch.Tensor] = {}
_seed_values: dict[str, int] = {}
SEEDED_DEVICES = ("cuda",)  # where the fused layer makes dropout itself (the CPU keeps peft's)
DROP_ROWS = 2048  # tokens whose dropped input exists at once (a mask per block, from seed + block)
SALT_BLOCKS = 1 << 20  # salts of one layer's blocks: layer salt * SALT_BLOCKS + block
DEVICE_DROPOUT = {"on": False}  # graphed.Steps turns it on: masks from the Triton kernel


def seed_tensor(device: torch.device | str) -> torch.Tensor:
    """The micro-batch's dropout seed, one int64 on `device`, which the Triton kernel reads (a
    CUDA graph captures its address, not its value)."""
    key = str(torch.device(device))
    found = _seeds.get(key)
    if found is None:
        found = _seeds[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return found


def set_dropout_seed(device: torch.device | str, value: int) -> None:
    """The seed every fused layer's masks come from until the next call, on the device (for the
    kernel) and on the host (for torch's generator, without a device read)."""
    seed_tensor(device).fill_(value)
    _seed_values[str(torch.device(device))] = value


def new_dropout_seed(device: torch.device | str) -> None:
    """Draw the next micro-batch's dropout seed from the CPU generator (the training loop seeds it
    per step: a resumed run draws the same masks). Call before the forward pass, and outside a
    CUDA graph (before its replay); checkpointing's recompute reads the same seed."""
    set_dropout_seed(device, int(torch.randint(0, 2**62, (1,))))


def _kernel_dropout(x: torch.Tensor) -> bool:
    from appliance.stages.train import dropkernel

    return x.is_cuda and DEVICE_DROPOUT["on"] and dropkernel.available()


def dropped(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    """x with dropout p, the mask drawn from the micro-batch's seed + `salt`: the same seed and
    salt give the same mask, so the backward pass draws it again instead of keeping it (or the
    dropped copy of x). Under CUDA graphs one Triton kernel that reads the seed on the device (a
    replay draws new masks); otherwise torch's generator, seeded from the host."""
    if _kernel_dropout(x):
        from appliance.stages.train import dropkernel

        return dropkernel.dropped(x, p, seed_tensor(x.device), salt)
    key = str(x.device)
    gen = _generators.get(key)
    if gen is None:
        gen = _generators[key] = torch.Generator(device=x.device)
    gen.manual_seed(_seed_values.get(key, 0) + salt)
    keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1 - p, generator=gen)
    return x * keep * (1 / (1 - p))


def row_blocks(rows: int) -> list[tuple[int, int, int]]:
    """(block index, first row, end row) of DROP_ROWS-row blocks."""
    return [(i, s, min(s + DROP_ROWS, rows)) for i, s in enumerate(range(0, rows, DROP_ROWS))]


class LoRALinear(torch.autograd.Function):
    """`drop` = (p, salt) makes the dropout here (xd is then unused), DROP_ROWS tokens at a time,
    each block's mask from the micro-batch's seed (seed_tensor) and the layer's salt: only x,
    which the layers reading the same input share, is kept for backward, where each block's mask
    is drawn again. peft's dropout module keeps its mask and the dropped copy per
    adapted layer (3 bytes per input element: about 2 GB for one recomputed layer of a 7B at 16k
    tokens), and makes them whole (a down projection's at 16k: 0.9 GB at once)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                layer: Any, scale: float, drop: tuple[float, int] | None = None) -> torch.Tensor:
        dtype, base = x.dtype, layer.get_base_layer()
        w = base_weight(base, dtype)
        la, lb = _compute_copies(layer, a, b, scale, dtype)
        if drop is None:
            xa = xd @ la.t()
        else:
            x2 = x.reshape(-1, x.shape[-1])
            xa = x2.new_empty(x2.shape[0], la.shape[0])
            for i, s, e in row_blocks(x2.shape[0]):
                xa[s:e] = dropped(x2[s:e], drop[0], drop[1] * SALT_BLOCKS + i) @ la.t()
            xa = xa.view(*x.shape[:-1], -1)
        y = torch.addmm((x @ w.t()).flatten(0, -2), xa.flatten(0, -2), lb.t()).view(*x.shape[:-1], -1)
        if base.bias is not None:
            y = y + base.bias.to(dtype)
        ctx.save_for_backward(x if drop is not None else xd, xa, a, b)
        ctx.layer, ctx.scale, ctx.drop = layer, scale, drop
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        src, xa, a, b = ctx.saved_tensors
        drop = ctx.drop
        dtype = g.dtype
        la, lb = _compute_copies(ctx.layer, a, b, ctx.scale, dtype)
        g2 = g.flatten(0, -2)
        gb = g2 @ lb                                        # [tokens, r]
        grad_x = grad_xd = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ base_weight(ctx.layer.get_base_layer(), dtype)).view(*g.shape[:-1], -1)
        if ctx.needs_input_grad[1] and drop is None:
            grad_xd = (gb @ la).view(*g.shape[:-1], -1)
        if drop is None:
            if ctx.needs_input_grad[2]:
                grad_a = (gb.t() @ src.flatten(0, -2)).to(a.dtype)
        else:  # block by block, each block's mask drawn again from its seed
            x2 = src.reshape(-1, src.shape[-1])
            gx2 = grad_x.view(-1, grad_x.shape[-1]) if grad_x is not None else None
            acc = torch.zeros(la.shape, dtype=torch.float32, device=g.device)
            for i, s, e in row_blocks(x2.shape[0]):
                salt = drop[1] * SALT_BLOCKS + i
                if ctx.needs_input_grad[2]:
                    acc += gb[s:e].t() @ dropped(x2[s:e], drop[0], salt)
                if gx2 is not None:  # d(x * mask / (1-p)) / dx: the same mask on the gradient
                    gx2[s:e] += dropped(gb[s:e] @ la, drop[0], salt)
            grad_a = acc.to(a.dtype) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[3]:
            grad_b = (g2.t() @ xa.flatten(0, -2)).to(b.dtype) * ctx.scale
        return grad_x, grad_xd, grad_a, grad_b, None, None, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
            or active[0] in self.lora_variant or active[0] not in self.lora_A):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
    dropout = self.lora_dropout[name]
    if (x.device.type in SEEDED_DEVICES and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0
            and dropout.training):
        # the micro-batch's seed (new_dropout_seed: drawn once per forward pass, so gradient
        # checkpointing's recompute reads it again) and this layer's own salt
        return LoRALinear.apply(x, x, a, b, self, scale, (dropout.p, self._drop_salt))
    return LoRALinear.apply(x, dropout(x), a, b, self, scale)


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
            layer._drop_salt = count  # its own masks, by its place in the model: a resume agrees
            count += 1
    return count
