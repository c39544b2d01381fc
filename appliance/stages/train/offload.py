"""Gradient checkpointing whose saved layer inputs wait in host memory (`offload_activations`).

Under gradient checkpointing each decoder layer keeps only its input hidden states for the
backward pass, which runs the layer again: batch x seq x hidden x 2 bytes per layer. On the
Llama-3.2-1B shape (16 layers, 4 x 2048 tokens) that is 0.5 GiB, the gap between our peak and
Unsloth's, which moves them to the host; on the Qwen2.5-7B shape at 16,384 tokens it is 3.1 GiB
of a 16 GB T4. Here each layer's input is copied to pinned host memory on a side stream as soon as
the layer has run (the copy engine overlaps it with the next layers' kernels) and copied back just
before that layer's backward. The cost is the PCIe traffic: the inputs cross twice per step, and
the copy back is waited for.

The pinned host memory (the same bytes, rounded up by PyTorch's caching host allocator, which
keeps the blocks) is not counted by the GPU planner.

The recompute sees the random state the forward saw (CPU and CUDA generators restored, as torch's
checkpoint does), so LoRA dropout draws the same masks. The layer's autograd graph is built and
walked inside this function's backward (a "reentrant" checkpoint): DDP cannot follow that without
a static graph, so `config.validate` refuses the option with `devices` > 1.
"""

from __future__ import annotations

from typing import Any

import torch

_streams: dict[torch.device, Any] = {}


def _side_stream(device: torch.device) -> Any:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def to_host(hidden: torch.Tensor) -> torch.Tensor:
    """A host copy of `hidden`, made asynchronously on a side stream for a CUDA tensor; a CPU
    tensor is kept as it is (it is already in host memory)."""
    if not hidden.is_cuda:
        return hidden.detach()
    stream = _side_stream(hidden.device)
    stream.wait_stream(torch.cuda.current_stream(hidden.device))
    host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(hidden, non_blocking=True)
    hidden.record_stream(stream)  # its memory is not reused before the copy has read it
    return host


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` back on `device`, ready for the current stream to use."""
    if device.type != "cuda":
        return host
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        back = host.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    back.record_stream(current)
    return back


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Any, hidden: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.device = run, hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.host = to_host(hidden)
        out = run(hidden)  # autograd is off inside forward: nothing of the layer is kept
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"offload_activations: the decoder layer returned {type(out).__name__}, "
                            "not a tensor (a transformers version this engine does not know)")
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None]:
        hidden = to_device(ctx.host, ctx.device).detach().requires_grad_(True)
        ctx.host = None
        cuda = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=cuda):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return None, hidden.grad


def checkpoint(run: Any, hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
    """transformers' `_gradient_checkpointing_func` signature: the layer (its keyword arguments
    bound) and its positional inputs; only the hidden states are positional in the layers we
    train (transformers 4.57)."""
    if rest:
        raise TypeError(f"offload_activations: the decoder layer got {1 + len(rest)} positional "
                        "inputs, expected the hidden states only")
    if not torch.is_grad_enabled():
        return run(hidden)  # no backward will come: nothing to keep, nothing to copy
    if not hidden.requires_grad:  # autograd would never call backward: no adapter gradients
        raise RuntimeError("offload_activations: the layer input does not require grad (enable "
                           "input gradients on the model, as load_model does)")
    return _Offloaded.apply(run, hidden)


def enable(model: Any) -> int:
    """Point every checkpointed layer of `model` (gradient checkpointing already enabled) at
    `checkpoint`; returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
              and m.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = checkpoint  # type: ignore[assignment]
    return len(layers)
