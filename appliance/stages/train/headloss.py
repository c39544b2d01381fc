"""The loss head: cross-entropy of the last hidden states through the frozen output embedding,
with the gradient w.r.t. the hidden states made in the forward pass.

A vocabulary of 128k-152k entries makes the head the largest matmul of a small model's step and
its fp32 logits the largest tensor. The loop used to compute them a chunk at a time under
activation checkpointing: the head's matmul ran three times per chunk (forward, the checkpoint's
recompute, backward) and the log-softmax's forward twice and backward once, each a full pass over
[chunk, vocab] fp32. The head is frozen, so the only gradient it passes on is w.r.t. the hidden
states, and while a chunk's logits exist that gradient costs one more matmul: softmax minus the
one-hot target, times the weight. Made then, it is kept ([tokens, hidden], the size of the
hidden states) and scaled by the incoming gradient in backward: two head matmuls per chunk, no
recompute, and the softmax computed in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from appliance.chat import IGNORE_INDEX


def head_loss(states: Any, weight: Any, targets: Any, chunk: int) -> Any:
    """sum over positions of cross-entropy(states @ weight^T, targets), ignored targets skipped.

    The gradient w.r.t. `states` is made in the forward pass, chunk by chunk, while the chunk's
    logits exist (the head is frozen, so that is the only gradient): the head's matmul runs twice
    per chunk instead of three times (forward, checkpoint recompute, backward), and the softmax's
    backward is the softmax itself, minus one at the target."""
    make_grad = states.requires_grad and torch.is_grad_enabled()  # not inside Function.forward
    return _HeadLoss.apply(states, weight, targets, chunk, make_grad)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, make_grad: bool) -> torch.Tensor:
        assert not weight.requires_grad, "the head is frozen: head_loss makes no weight gradient"
        total = states.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(states) if make_grad else None
        for start in range(0, targets.shape[0], chunk):
            end = start + chunk
            target = targets[start:end]
            valid = (target != IGNORE_INDEX)[:, None]
            safe = target.clamp_min(0)[:, None]
            logits = (states[start:end].to(weight.dtype) @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total = total + ((lse - logits.gather(1, safe)) * valid).sum()
            if grad is not None:  # d loss / d logits = softmax - one-hot(target), on valid rows
                probs = logits.sub_(lse).exp_()
                probs.scatter_add_(1, safe, -valid.to(probs.dtype))
                probs.mul_(valid)
                grad[start:end] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.states_dtype = states.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        # in fp32: g carries fp16's loss scale (65536 at first: inf in fp16) and 1 / trained tokens
        return (grad.float() * g.float()).to(ctx.states_dtype), None, None, None, None
