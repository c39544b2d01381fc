"""The fused-kernel binding (train/kernels.py): which modules it rebinds, what each rebound module
passes to the kernel, and that nothing changes for CPU tensors or for models built later.

Liger's Triton kernels need CUDA (CI has none): here they are stood in for by plain-torch
functions with Liger's signatures and `on_gpu` routes CPU tensors to them, so a wrong argument
order (gate and up swapped, cos and sin swapped, the epsilon dropped) changes the logits and
fails. tests/gpu/test_kernels_gpu.py runs the real kernels against the plain modules on a GPU."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from transformers.models.llama import modeling_llama  # noqa: E402

from appliance.stages.train import kernels  # noqa: E402
from appliance.stages.train.config import validate  # noqa: E402
from appliance.stages.train.recipe import load_model  # noqa: E402
from tests.conftest import randomize_lora_b  # noqa: E402


def _stand_in(calls: Counter) -> SimpleNamespace:
    def rms_norm(x: Any, w: Any, eps: float, offset: float, casting: str, in_place: bool) -> Any:
        calls["norm"] += 1
        assert (offset, casting) == (0.0, "llama")
        var = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)

    def swiglu(a: Any, b: Any) -> Any:
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a) * b

    def rope(q: Any, k: Any, cos: Any, sin: Any, position_ids: Any, unsqueeze_dim: int) -> Any:
        calls["rope"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        half = modeling_llama.rotate_half
        return q * cos + half(q) * sin, k * cos + half(k) * sin

    return SimpleNamespace(liger_rms_norm=rms_norm, liger_swiglu=swiglu, liger_rope=rope)


def _isolate_rope(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RoPE wrapper is process-wide (an earlier CUDA test may have installed it with the real
    kernel): restore transformers' function and the wrapper's choice after the test."""
    monkeypatch.setattr(kernels, "_rope", {})
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)


def _model(folder: Path, **extra: Any) -> Any:
    cfg = validate({"quantization": "none", "lora_r": 8, "lora_alpha": 16, "seed": 3,
                    "lora_dropout": 0.0, **extra})
    model = load_model(folder, cfg, "cpu", torch.float32)
    randomize_lora_b(model)
    return model


def _rebound(model: Any) -> list[str]:
    """Norms and MLPs whose forward is bound on the instance (fastlora binds its LoRA layers')."""
    return [type(m).__name__ for m in model.modules() if "forward" in vars(m)
            and type(m).__name__.endswith(("RMSNorm", "MLP"))]


def _logits(model: Any, ids: Any) -> Any:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_on_the_cpu_nothing_is_rebound_and_the_log_says_why(tiny_llama_source: Path) -> None:
    model = _model(tiny_llama_source)
    assert model.appliance_kernels == "fused kernels off: Triton kernels run on CUDA only"
    assert _rebound(model) == []


def test_each_reason_to_stay_plain_is_named(tiny_llama_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_llama_source)
    assert "set in the config" in kernels.apply(model, "cuda:0", "off")
    monkeypatch.setattr(kernels, "_liger", lambda: (None, "liger_kernel is not installed (...)"))
    assert "liger_kernel is not installed" in kernels.apply(model, "cuda:0")
    monkeypatch.setattr(model.config, "hidden_act", "gelu")
    assert "activation is 'gelu'" in kernels.apply(model, "cuda:0")
    monkeypatch.setattr(model.config, "model_type", "gemma")
    assert "model type 'gemma'" in kernels.apply(model, "cuda:0")
    assert _rebound(model) == []


def test_rebound_modules_compute_what_transformers_does(tiny_llama_source: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tiny_llama_source)
    ids = torch.randint(3, 49152, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = _logits(model, ids)
    calls: Counter = Counter()
    monkeypatch.setattr(kernels, "_liger", lambda: (_stand_in(calls), ""))
    monkeypatch.setattr(kernels, "on_gpu", lambda tensor: True)
    _isolate_rope(monkeypatch)
    line = kernels.apply(model, "cuda:0")
    layers = model.config.num_hidden_layers
    assert f"RMSNorm x{2 * layers + 1}, SwiGLU x{layers}, RoPE" in line
    assert len(_rebound(model)) == 3 * layers + 1
    fused = _logits(model, ids)
    assert calls == {"norm": 2 * layers + 1, "swiglu": layers, "rope": layers}
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    kernels.apply(model, "cuda:0")  # twice: RoPE is wrapped once, not around its own wrapper
    assert getattr(modeling_llama.apply_rotary_pos_emb.appliance_plain, "appliance_plain", None) is None
    calls.clear()
    assert "set in the config" in kernels.apply(model, "cuda:0", "off")
    _logits(model, ids)  # the norms and MLPs of this instance stay bound; RoPE goes back to plain
    assert calls["rope"] == 0 and calls["norm"] > 0


def test_cpu_tensors_and_later_models_stay_on_transformers_code(tiny_llama_source: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter = Counter()
    monkeypatch.setattr(kernels, "_liger", lambda: (_stand_in(calls), ""))
    _isolate_rope(monkeypatch)
    model = _model(tiny_llama_source)
    kernels.apply(model, "cuda:0")  # bound, but its tensors are on the CPU: on_gpu says no
    ids = torch.randint(3, 49152, (1, 7), generator=torch.Generator().manual_seed(2))
    _logits(model, ids)
    later = _model(tiny_llama_source)  # a merge or an evaluation in the same process
    assert _rebound(later) == []
    _logits(later, ids)
    assert calls == {}
