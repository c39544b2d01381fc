"""The loss head (headloss.head_loss: the gradient w.r.t. the hidden states made in the forward
pass) gives torch's own cross-entropy over full logits: the same summed value and the same
gradient, ignored targets skipped, whatever the chunk, in fp32 and bf16; no gradient is made
when none is needed (evaluation)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from appliance.chat import IGNORE_INDEX  # noqa: E402
from appliance.stages.train.headloss import head_loss  # noqa: E402


def _case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    states = torch.randn(37, 24, generator=g).to(dtype)
    weight = (torch.randn(301, 24, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, 301, (37,), generator=g)
    targets[[0, 5, 6, 36]] = IGNORE_INDEX
    return states, weight, targets


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                            (torch.float16, 1e-2)])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_the_head_loss_is_torchs_cross_entropy(dtype: torch.dtype, tol: float, chunk: int) -> None:
    states, weight, targets = _case(dtype)
    ref_in = states.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((ref_in @ weight.t()).float(), targets, reduction="sum")
    (ref * 0.5).backward()
    got_in = states.clone().requires_grad_()
    got = head_loss(got_in, weight, targets, chunk)
    (got * 0.5).backward()
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    assert got_in.grad is not None and ref_in.grad is not None
    err = float((got_in.grad.float() - ref_in.grad.float()).norm() / ref_in.grad.float().norm())
    assert err < tol
    assert torch.all(got_in.grad[[0, 5, 6, 36]] == 0)  # ignored positions pass nothing back
    assert got_in.grad.dtype == dtype


def test_a_loss_scale_beyond_fp16s_range_scales_in_fp32() -> None:
    """A T4 trains in fp16 with a loss scale that starts at 65536 and multiplies 1 / trained tokens:
    the incoming gradient can exceed fp16's largest value (65504) while the scaled gradient does
    not. The product is made in fp32, so it stays finite and right."""
    states, weight, targets = _case(torch.float32)
    weight = weight * 0.01  # gradients ~3e-3: times 70000, well inside fp16
    ref_in = states.clone().requires_grad_()
    (torch.nn.functional.cross_entropy(ref_in @ weight.t(), targets, reduction="sum") * 70000.0).backward()
    got_in = states.half().requires_grad_()
    (head_loss(got_in, weight.half(), targets, 8) * 70000.0).backward()
    assert got_in.grad is not None and ref_in.grad is not None
    assert torch.isfinite(got_in.grad).all()
    assert float((got_in.grad.float() - ref_in.grad).norm() / ref_in.grad.norm()) < 1e-2


def test_no_gradient_is_made_without_grad() -> None:
    states, weight, targets = _case(torch.float32)
    states.requires_grad_()  # as the model's hidden states are, but evaluated under no_grad
    with torch.no_grad():
        value = head_loss(states, weight, targets, 8)
    assert not value.requires_grad and value.grad_fn is None
    ref = torch.nn.functional.cross_entropy(states @ weight.t(), targets, reduction="sum")
    assert float(value) == pytest.approx(float(ref), rel=1e-5)
