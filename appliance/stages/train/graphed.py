"""A training step's forward and backward replayed as one CUDA graph per batch shape.

Profiled on the lent H100s (bench/profile_step.py) our step is host-bound: thousands of small
kernel launches, each behind the Python of peft, transformers and autograd, on a slow host core,
and the step time moved with the host (24.8k-35.1k tokens/s on the same card for the 1B shape).
A CUDA graph records the launches of one forward + backward once and replays them with one call:
the host's share of the step goes to ~zero, and the GPU runs back to back (bench/results: 1.27-1.34x
Unsloth's speed at 1B where the eager step ran 0.7-1.0x).

What a capture needs, and how this module gives it:
- no host synchronisation inside: the loss covers every position of a fixed [batch, seq] shape
  (ignored labels weigh nothing) instead of gathering the trained positions (a data-dependent
  size), and no attention mask is passed (right padding is harmless under causal attention);
- random numbers that change between replays: LoRA dropout is the fused layer's Triton kernel,
  which reads its seed from a device tensor the host refills before each replay
  (fastlora.new_dropout_seed, dropkernel); checkpointing stashes no RNG state (torch cannot read
  it during a capture), which the seeded masks do not need. Without Triton, dropout is refused;
- static tensors: the batch is copied into the graph's own input tensors; gradients accumulate
  into `.grad` tensors made once, before the first capture, which every graph writes (zeroed in
  place by the caller after each optimizer step); the adapter's compute-dtype copies (fastlora)
  are remade inside the graph, so a replay sees the optimizer's in-place updates.
- one graph per padded shape (`Steps`): the batch is padded to the configured batch size and its
  length up to a bucket (at most 1/8 more tokens), and the graphs share one memory pool.
The optimizer step stays outside the graph (its step count and learning rate change per step).
"""

from __future__ import annotations

from typing import Any

import torch

from appliance.errors import ApplianceError
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


def unseeded_dropout(model: Any) -> list[str]:
    """What draws random numbers a graph cannot: with checkpointing's RNG stash off (a capture
    cannot read the generator's state) its recompute would draw other masks than its forward.
    Dropout modules with p > 0 but the LoRA dropouts of fused layers (drawn from the seed tensor
    by the Triton kernel; those too where Triton is missing), and attention dropout."""
    from appliance.stages.train import dropkernel

    seeded: set[int] = set()
    if dropkernel.available():
        for module in model.modules():
            if "_peft_forward" in module.__dict__:  # fastlora.fuse patched it
                seeded.update(id(d) for d in module.lora_dropout.values())
    found = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Dropout) and m.p > 0 and id(m) not in seeded]
    if float(getattr(getattr(model, "config", None), "attention_dropout", 0) or 0) > 0:
        found.append("attention_dropout (the model's config)")
    return found


def _grads(params: list[Any]) -> list[Any]:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # made once: every graph captures accumulation into it
    return [p.grad for p in params]


class GraphedStep:
    """forward + backward of one [batch, seq] shape, captured once, replayed per micro-batch.

    `__call__(input_ids, labels, weight)` copies the batch in, draws the dropout seed, replays,
    and returns the summed loss and the count of trained tokens (tensors, valid after the replay);
    the gradients are those of `weight * summed loss` (the training loop's 1 / trained tokens of
    the whole step, times the loss scale where fp16 needs one), added to what the parameters'
    `.grad` hold. Zero them in place (`zero_grad(set_to_none=False)`) after each optimizer step:
    setting them to None would detach the graph's output. Gradients already accumulated when a
    new shape is captured are kept (stashed around the capture)."""

    def __init__(self, model: Any, input_ids: Any, labels: Any, chunk: int, warmup: int = 2,
                 pool: Any = None) -> None:
        if unseeded := unseeded_dropout(model):
            raise ValueError(f"random numbers a CUDA graph cannot draw again ({unseeded[0]}): "
                             "lora_dropout must be 0, or the layer fused and Triton installed")
        fastlora.DEVICE_DROPOUT["on"] = True  # masks from the kernel, seeded on the device
        fastlora.seed_tensor(input_ids.device)  # made before the capture, not inside it
        self.model, self.chunk = model, chunk
        self.ids, self.labels = input_ids.clone(), labels.clone()
        self.weight = torch.ones((), dtype=torch.float32, device=input_ids.device)
        grads = _grads([p for p in model.parameters() if p.requires_grad])
        stash = [g.clone() for g in grads]
        try:
            self._capture(grads, warmup, pool)
        finally:  # what earlier micro-batches of this step accumulated, kept even if capture failed
            for g, kept in zip(grads, stash, strict=True):
                g.copy_(kept)
            # the compute copies cached during the capture live in the graph's pool and hold what
            # the last replay wrote, if any: eager code makes its own
            fastlora.weights_changed()

    def _capture(self, grads: list[Any], warmup: int, pool: Any) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, kernels) off-graph
            for _ in range(warmup):  # the seed tensor as it is: no CPU draw, so a resumed run,
                total, count = self._forward()  # which captures at other steps, draws the same
                (total / count).backward()
        torch.cuda.current_stream().wait_stream(side)
        for g in grads:
            g.zero_()
        fastlora.weights_changed()  # the adapter's compute copies are made inside the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.total, self.count = self._forward()
            (self.total * self.weight).backward()

    def _forward(self) -> tuple[Any, Any]:
        return dense_loss(self.model, self.ids, self.labels, self.chunk)

    def __call__(self, input_ids: Any, labels: Any, weight: Any = 1.0) -> tuple[Any, Any]:
        self.ids.copy_(input_ids)
        self.labels.copy_(labels)
        self.weight.copy_(weight) if hasattr(weight, "shape") else self.weight.fill_(weight)
        fastlora.new_dropout_seed(self.ids.device)
        self.graph.replay()
        return self.total, self.count


def bucket(length: int, floor: int = 64) -> int:
    """The padded length of a batch `length` tokens long: a multiple of 1/8 of the power of two
    below it (at most 12.5% padding), never under `floor`: few shapes, so few captures."""
    if length <= floor:
        return floor
    grain = max(floor, 1 << (length.bit_length() - 4))
    return -(-length // grain) * grain


def pad(ids: Any, labels: Any, rows: int, length: int, pad_id: int) -> tuple[Any, Any]:
    """`ids`/`labels` padded on the right to [rows, length] (pad_id, ignored labels)."""
    out_ids = ids.new_full((rows, length), pad_id)
    out_labels = labels.new_full((rows, length), IGNORE_INDEX)
    out_ids[: ids.shape[0], : ids.shape[1]] = ids
    out_labels[: labels.shape[0], : labels.shape[1]] = labels
    return out_ids, out_labels


class Steps:
    """The training loop's graphed micro-batch: pads each batch to [batch_size, bucket(length)],
    captures a graph the first time a shape comes (all in one memory pool), replays it after."""

    def __init__(self, model: Any, batch_size: int, pad_id: int, chunk: int,
                 log: Any = None) -> None:
        self.model, self.rows, self.pad_id, self.chunk = model, batch_size, pad_id, chunk
        self.log = log or (lambda _message: None)
        self.graphs: dict[tuple[int, int], GraphedStep] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, input_ids: Any, labels: Any, weight: Any) -> tuple[Any, Any]:
        shape = (max(self.rows, input_ids.shape[0]), bucket(input_ids.shape[1]))
        ids, labels = pad(input_ids, labels, *shape, self.pad_id)
        step = self.graphs.get(shape)
        if step is None:
            self.log(f"CUDA graph: capturing the step for batches of {shape[0]} x {shape[1]} tokens "
                     f"({len(self.graphs) + 1} shape{'s' if self.graphs else ''} so far)")
            try:
                step = GraphedStep(self.model, ids, labels, self.chunk,
                                   warmup=1 if self.graphs else 2, pool=self.pool)
            except ValueError:
                raise
            except Exception as exc:  # a failed capture leaves torch's stream and pool state behind
                raise ApplianceError(
                    f"capturing the CUDA graph for batches of {shape[0]} x {shape[1]} tokens failed: "
                    f"{exc}", title="CUDA graph capture failed",
                    hint="the job stopped at its last checkpoint; resume it with cuda_graphs=off "
                         "(--set cuda_graphs=off), or a smaller batch_size or max_seq_len") from exc
            self.graphs[shape] = step
        return step(ids, labels, weight)
