"""Gradient checkpointing whose saved layer inputs wait in host memory (`offload_activations`).

Under gradient checkpointing each decoder layer keeps only its input hidden states for the
backward pass, which runs the layer again: batch x seq x hidden x 2 bytes per layer. On the
Llama-3.2-1B shape (16 layers, 4 x 2048 tokens) that is 0.5 GiB, the gap between our peak and
Unsloth's, which moves them to the host; on the Qwen2.5-7B shape at 16,384 tokens it is 3.1 GiB
of a 16 GB T4. Here each layer's input is copied to pinned host memory on a side stream while the
layer runs (the copy engine overlaps it with the layer's kernels), and in the backward pass the
input of the layer before is copied back while this one's backward runs (prefetch): the PCIe
traffic, twice the inputs per step, mostly hides behind compute.

The same code runs eagerly and inside a CUDA graph capture (`cuda_graphs`, graphed.py), which is why
it is built as it is:
- the host side is one pinned buffer per layer (`_Arena`), made before any capture (the graph's
  warm-up pass, or `reserve`): a captured copy writes to a fixed address. Batches view its first
  bytes. A larger batch than reserved gets a larger buffer; once a graph was captured the old one
  is kept for the life of the process (the graph may still write to it);
- no `record_stream` (under a capture torch defers such frees to the capture's end, which would keep
  every layer input alive): the side stream's read of a layer input is waited for by the main
  stream before the input's memory can be reused (`_pending`), and a copy back lands in a tensor
  made on the main stream, which waits for the copy before using it. The last layer's input is
  let go as soon as its copy is done, so the GPU holds at most two layer inputs beyond the
  recompute (one in the forward, the prefetched one in the backward);
- each pass starts clean at its first layer: a pass that never reached its backward (an error,
  a forward that was not backpropagated) leaves no copy for the next one to wait on or prefetch;
- the RNG state is stashed for the recompute only outside a capture (torch cannot read it inside
  one; the graphed step's only random numbers, the fused layer's dropout masks, come from a seed
  tensor and are drawn again without it).

The pinned host memory (layers x the largest batch's inputs, each buffer rounded up to a power of
two by PyTorch's host allocator) is not counted by the GPU planner; the job log states it.
The layer's autograd graph is built and walked inside this function's backward (a "reentrant"
checkpoint): DDP cannot follow that without a static graph, so `config.validate` refuses the
option with `devices` > 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

_streams: dict[torch.device, Any] = {}
_pending: dict[torch.device, torch.Tensor] = {}  # a layer input the side stream may still be reading
_last: dict[torch.device, _Slot] = {}  # the slot of the layer offloaded last, on each device


def _side_stream(device: torch.device) -> Any:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Arena:
    """One pinned host buffer per layer. A buffer outgrown after a capture is kept (the graph's
    copies target it); before any, it is freed once the copies in flight are done."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []
        self.captured = False

    def view(self, layer: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        numel = shape.numel()
        buffer = self.buffers.get((layer, dtype))
        if _capturing():
            self.captured = True
            if buffer is None or buffer.numel() < numel:
                raise RuntimeError(f"offload_activations: no host buffer of {numel} elements for "
                                   f"layer {layer} was made before the CUDA graph capture")
        elif buffer is None or buffer.numel() < numel:
            if buffer is not None and self.captured:
                self.kept.append(buffer)
            elif buffer is not None and torch.cuda.is_available():
                torch.cuda.synchronize()  # no copy in flight reads or writes the old buffer
            buffer = torch.empty(numel, dtype=dtype, pin_memory=torch.cuda.is_available())
            self.buffers[(layer, dtype)] = buffer
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        """Host memory held: each pinned buffer as PyTorch's host allocator rounds it (a power of
        two), plain ones (no CUDA) as they are."""
        sizes = [b.numel() * b.element_size() for b in [*self.buffers.values(), *self.kept]]
        if not torch.cuda.is_available():
            return sum(sizes)
        return sum(1 << max(0, size - 1).bit_length() for size in sizes)


ARENA = _Arena()


def reserve(model: Any, tokens: int, dtype: torch.dtype) -> int:
    """Make the host buffers for batches of up to `tokens` tokens now, one per offloaded layer of
    `model` (pinned allocation is slow, and impossible inside a capture); the bytes they hold."""
    hidden = int(model.config.hidden_size)
    for layer in range(len(_layers(model))):
        ARENA.view(layer, torch.Size((tokens, hidden)), dtype)
    return ARENA.nbytes()


@dataclass(eq=False)
class _Slot:
    """One offloaded layer input of one pass: where it waits, and its copy back once started."""
    host: torch.Tensor | None
    device: torch.device
    prev: _Slot | None = None  # the layer before it in the forward pass, whose input to prefetch
    back: torch.Tensor | None = None


def _join(device: torch.device, copied_back: bool = False) -> None:
    """The main stream waits for the side stream's copies so far (when an input is being read, or
    a copy back was started); the input it read may go."""
    if _pending.pop(device, None) is not None or copied_back:
        torch.cuda.current_stream(device).wait_stream(_side_stream(device))


def to_host(hidden: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """`hidden` copied into the arena's buffer for `layer`, asynchronously on a side stream for a
    CUDA tensor (kept referenced until the main stream has waited for the copy); a CPU tensor is
    kept as it is (it is already in host memory)."""
    if not hidden.is_cuda:
        return hidden.detach()
    _join(hidden.device)  # the previous layer's copy has read its input by now
    host = ARENA.view(layer, hidden.shape, hidden.dtype)
    stream = _side_stream(hidden.device)
    stream.wait_stream(torch.cuda.current_stream(hidden.device))
    with torch.cuda.stream(stream):
        host.copy_(hidden, non_blocking=True)
    _pending[hidden.device] = hidden
    return host


def _start_copy_back(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    back = torch.empty(host.shape, dtype=host.dtype, device=device)  # made on the main stream
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        back.copy_(host, non_blocking=True)
    return back


def _restore(slot: _Slot) -> torch.Tensor:
    """The slot's input on its device, and the copy back of the layer before it started."""
    if slot.device.type != "cuda":
        assert slot.host is not None
        return slot.host
    back = slot.back if slot.back is not None else _start_copy_back(slot.host, slot.device)  # type: ignore[arg-type]
    _join(slot.device, copied_back=True)
    prev, slot.prev, slot.back, slot.host = slot.prev, None, None, None
    if prev is not None and prev.host is not None:  # overlaps with this layer's backward
        prev.back = _start_copy_back(prev.host, prev.device)
    return back


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Any, hidden: torch.Tensor, layer: int, last: bool) -> torch.Tensor:
        ctx.run = run
        if layer == 0:  # a new pass: nothing of an earlier, unfinished one carries over
            _join(hidden.device)
            _last.pop(hidden.device, None)
        ctx.rng = None
        if not _capturing():
            ctx.rng = (torch.get_rng_state(),
                       torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
        prev = _last.get(hidden.device)
        ctx.slot = _Slot(to_host(hidden, layer), hidden.device,
                         prev if prev is not None and prev.host is not None else None)
        _last[hidden.device] = ctx.slot
        out = run(hidden)  # autograd is off inside forward: nothing of the layer is kept
        if last:  # its copy ran beside the layer: let the input go before the head's work
            _join(hidden.device)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"offload_activations: the decoder layer returned {type(out).__name__}, "
                            "not a tensor (a transformers version this engine does not know)")
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, None, None]:
        slot: _Slot = ctx.slot
        ctx.slot = None  # the slot holds the host view: gone with the backward
        if _last.get(slot.device) is slot:
            del _last[slot.device]
        hidden = _restore(slot).detach().requires_grad_(True)
        if ctx.rng is None:
            with torch.enable_grad():
                out = ctx.run(hidden)
        else:
            cpu_rng, cuda_rng = ctx.rng
            with torch.random.fork_rng(devices=[slot.device] if cuda_rng is not None else []):
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, slot.device)
                with torch.enable_grad():
                    out = ctx.run(hidden)
        torch.autograd.backward(out, grad)
        return None, hidden.grad, None, None


def checkpoint(run: Any, hidden: torch.Tensor, *rest: Any, layer: int = 0,
               layers: int = 1) -> torch.Tensor:
    """transformers' `_gradient_checkpointing_func` signature: the layer (its keyword arguments
    bound) and its positional inputs; only the hidden states are positional in the layers we
    train (transformers 4.57). `layer` (of `layers`, in forward order) picks the host buffer and
    marks a pass's first and last layer (enable binds both)."""
    if rest:
        raise TypeError(f"offload_activations: the decoder layer got {1 + len(rest)} positional "
                        "inputs, expected the hidden states only")
    if not torch.is_grad_enabled():
        return run(hidden)  # no backward will come: nothing to keep, nothing to copy
    if not hidden.requires_grad:  # autograd would never call backward: no adapter gradients
        raise RuntimeError("offload_activations: the layer input does not require grad (enable "
                           "input gradients on the model, as load_model does)")
    return _Offloaded.apply(run, hidden, layer, layer == layers - 1)


def _layers(model: Any) -> list[Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
            and m.gradient_checkpointing]


def enable(model: Any) -> int:
    """Point every checkpointed layer of `model` (gradient checkpointing already enabled) at
    `checkpoint`, each with its own host buffer; returns how many."""
    layers = _layers(model)
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = functools.partial(checkpoint, layer=index,
                                                               layers=len(layers))
    return len(layers)
