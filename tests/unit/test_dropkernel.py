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
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(fastlora, "_kernel_dropout", lambda x: True)  # as under CUDA graphs
    monkeypatch.setattr(fastlora, "DROP_ROWS", 4)
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(24, 16)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.3)).to(DEVICE)
    layer = model.base_model.model[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 0.1)
    w, bias = layer.get_base_layer().weight.detach(), layer.get_base_layer().bias.detach()
    x = torch.randn(3, 5, 24, device=DEVICE)
    fastlora.set_dropout_seed(DEVICE, 42)
    seed = fastlora.seed_tensor(DEVICE)
    scale = float(layer.scaling["default"])
    out = []
    for fused in (True, False):
        xi = x.clone().requires_grad_()
        a.grad = b.grad = None
        if fused:
            y = fastlora.LoRALinear.apply(xi, xi, a, b, layer, scale, (0.3, 2))
        else:
            x2 = xi.reshape(-1, 24)
            # the kernel's masks (0 or 1 / (1 - p)), applied with a differentiable product
            masks = [dropkernel.dropped(torch.ones_like(x2[s:e]), 0.3, seed, 2 * fastlora.SALT_BLOCKS + i)
                     for i, s, e in fastlora.row_blocks(15)]
            xd = (x2 * torch.cat(masks)).view(3, 5, 24)
            y = xi @ w.t() + bias + (xd @ a.t()) @ b.t() * scale
        (y * torch.linspace(-1, 1, 16, device=DEVICE)).sum().backward()
        out.append((y.detach(), xi.grad, a.grad.clone(), b.grad.clone()))
    for got, ref in zip(out[0], out[1], strict=True):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
