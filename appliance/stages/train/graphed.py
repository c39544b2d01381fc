"""A fixed-shape training step's forward and backward replayed as one CUDA graph.

Profiled on the lent H100s (bench/profile_step.py) our step is host-bound: thousands of small
kernel launches, each behind the Python of peft, transformers and autograd, on a slow host core,
and the step time moved with the host (24.8k-35.1k tokens/s on the same card for the 1B shape).
A CUDA graph records the launches of one forward + backward once and replays them with one call:
the host's share of the step goes to ~zero, and the GPU runs back to back.

What a capture needs, and how this module gives it:
- no host synchronisation inside: the loss covers every position of a fixed [batch, seq] shape
  (ignored labels weigh nothing) instead of gathering the trained positions (a data-dependent
  size), and no attention mask is passed (right padding is harmless under causal attention);
- no RNG state saved by checkpointing: gradient checkpointing runs without stashing the RNG,
  which is exact only without dropout, so a graph is refused when LoRA dropout is on;
- static tensors: the batch is copied into the graph's own input tensors; gradients accumulate
  into `.grad` tensors made before the capture (zeroed by the caller after each optimizer step);
  the adapter's compute-dtype copies (fastlora) are remade inside the graph, so a replay sees
  the optimizer's in-place updates.
The optimizer step stays outside the graph (its step count and learning rate change per step).
"""

from __future__ import annotations

from typing import Any

import torch

from appliance.stages.train import fastlora
from appliance.stages.train.headloss import IGNORE_INDEX, head_loss


def dense_loss(model: Any, input_ids: Any, labels: Any, chunk: int) -> tuple[Any, Any]:
    """Summed cross-entropy over every labelled position and the count, both as tensors: no
    data-dependent shape, no host read. Logits exist `chunk` positions at a time (head_loss)."""
    causal = model.get_base_model()
    hidden = causal.model(input_ids=input_ids).last_hidden_state
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    weight = causal.get_output_embeddings().weight
    return head_loss(states, weight, targets, chunk), (targets != IGNORE_INDEX).sum()


def prepare(model: Any, dropout: float) -> None:
    """Gradient checkpointing without RNG stashing (torch cannot read the generator's state during
    a capture). Exact only when nothing in the layer draws random numbers."""
    if dropout:
        raise ValueError("a CUDA-graphed step needs lora_dropout 0 (checkpointing would replay "
                         "different dropout masks); set lora_dropout=0 or turn cuda_graphs off")
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})


class GraphedStep:
    """forward + backward of one [batch, seq] shape, captured once, replayed per micro-batch.

    `__call__(input_ids, labels, weight)` copies the batch in, replays, and returns the summed
    loss and the count of trained tokens (tensors, valid after the replay); the gradients are
    those of `weight * summed loss` (the training loop's 1 / trained tokens of the whole step,
    times the loss scale where fp16 needs one). Gradients accumulate in the parameters' `.grad`;
    zero them in place (`zero_grad(set_to_none=False)`) after each optimizer step: setting them
    to None would detach the graph's output."""

    def __init__(self, model: Any, input_ids: Any, labels: Any, chunk: int, warmup: int = 2) -> None:
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            raise ValueError("a CUDA graph would replay one dropout mask every step: lora_dropout must be 0")
        self.model, self.chunk = model, chunk
        self.ids, self.labels = input_ids.clone(), labels.clone()
        self.weight = torch.ones((), dtype=torch.float32, device=input_ids.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, kernels) off-graph
            for _ in range(warmup):
                total, count = self._forward()
                (total / count).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = torch.zeros_like(p)  # the capture records accumulation into these
        fastlora.weights_changed()  # the adapter's compute copies are made inside the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.total, self.count = self._forward()
            (self.total * self.weight).backward()

    def _forward(self) -> tuple[Any, Any]:
        return dense_loss(self.model, self.ids, self.labels, self.chunk)

    def __call__(self, input_ids: Any, labels: Any, weight: Any = 1.0) -> tuple[Any, Any]:
        self.ids.copy_(input_ids)
        self.labels.copy_(labels)
        self.weight.copy_(weight) if hasattr(weight, "shape") else self.weight.fill_(weight)
        self.graph.replay()
        return self.total, self.count
