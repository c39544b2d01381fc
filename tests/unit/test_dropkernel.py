"""The Triton dropout kernel the fused LoRA layer uses under CUDA graphs (dropkernel): the seed tensor and
the salt fix the mask, the kept share is 1 - p, kept values are scaled by 1 / (1 - p), the dtype
stays. Runs on a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 with triton
installed); CI's CPU-only torch has no triton, so it is skipped there."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 to run the kernel on the CPU", allow_module_level=True)

from appliance.stages.train import dropkernel, fastlora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


INTERPRETED = ([] if torch.cuda.is_available() else
               [pytest.mark.skip(reason="Triton's interpreter has no bf16 (numpy)")])


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=INTERPRETED),
                                   torch.float16])
def test_the_seed_and_salt_fix_the_mask(dtype: torch.dtype) -> None:
    x = torch.ones(3000, dtype=dtype, device=DEVICE) * 2
    seed = torch.tensor([987654321987], dtype=torch.int64, device=DEVICE)
    y = dropkernel.dropped(x, 0.25, seed, 5)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, dropkernel.dropped(x, 0.25, seed, 5))
    assert not torch.equal(y, dropkernel.dropped(x, 0.25, seed, 6))
    kept = (y != 0).float().mean().item()
    assert 0.70 < kept < 0.80
    assert torch.allclose(y[y != 0].float(), torch.tensor(2 / 0.75, device=DEVICE), rtol=1e-2)
    seed.fill_(1)  # refilled in place, as before a graph's replay: another mask
    assert not torch.equal(y, dropkernel.dropped(x, 0.25, seed, 5))


def test_the_fused_layer_gives_the_gradients_of_its_formula_with_the_kernel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused layer's forward and backward (masks drawn twice from the seed) against autograd
    through the explicit formula, both with the kernel's masks."""
    from tests.unit.test_fastlora import check_fused_dropout_against_formula

    monkeypatch.setattr(fastlora, "_kernel_dropout", lambda x: True)  # as under CUDA graphs
    monkeypatch.setattr(fastlora, "DROP_ROWS", 4)
    fastlora.set_dropout_seed(DEVICE, 42)
    seed = fastlora.seed_tensor(DEVICE)
    check_fused_dropout_against_formula(  # the kernel on ones: its mask, as a differentiable factor
        DEVICE, lambda block, salt: dropkernel.dropped(torch.ones_like(block), 0.3, seed, salt))
