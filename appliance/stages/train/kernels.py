"""Fused Triton kernels for the CUDA training step: Liger's RMSNorm, RoPE and SwiGLU.

Profiled on a lent H100 (bench/results/profile-llama1b-h100-v3.txt) a third of our step's GPU time
outside the matmuls was RMSNorm's fp32 round trip, RoPE's elementwise chain and SwiGLU's separate
activation and product: many small kernels and casts each way. Liger (liger-kernel, LinkedIn,
Apache-2.0: a well-kept package with forward and backward Triton kernels tested against
transformers' modules) fuses each into one kernel per direction; inside our engine it made the 1B
step 23% faster and 0.2 GiB smaller (bench/results/train-throughput-h100.md, v3b). We take
Liger's kernels, not its monkey patches: `apply_liger_kernel_to_*` replaces transformers' classes
and functions for the whole process, so a CPU model built later in the same process (a merge, an
export's scoring, an evaluation) would call Triton and fail. Here the norms and MLPs of one model
instance are rebound, RoPE's module function is wrapped, and every one of them falls back to
transformers' own code for a tensor that is not on a CUDA device.

The cross-entropy stays ours (headloss.py): it skips the prompt positions Liger's fused loss
would still compute. Only the families whose modules have the Llama layout are rebound (the
norm: weight x x / rms(x) with an fp32 variance; the MLP: down(silu(gate(x)) * up(x))). Their norms
feed only projections (or RoPE, for Qwen3's q/k norms), so the norm's in-place backward (dX
written into dY) is safe; post-norm families (Gemma 2/3, OLMo 2) would need in_place=False, as
Liger itself does for them.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

from appliance.versions import package_version

# model types with the Llama layout; each is also the name of the transformers module
# (`models/<type>/modeling_<type>.py`) whose `apply_rotary_pos_emb` its attention calls
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def on_gpu(tensor: Any) -> bool:
    """Whether a tensor goes to the Triton kernels (a function, so tests can route CPU tensors)."""
    return bool(tensor.is_cuda)


_rope: dict[str, Any] = {}  # family -> the functional module its RoPE wrapper calls on CUDA


def _liger() -> tuple[Any, str]:
    """liger_kernel's functional API, or None and why it cannot be imported (a CPU install:
    Triton comes only with CUDA builds of torch)."""
    try:
        return importlib.import_module("liger_kernel.transformers.functional"), ""
    except ModuleNotFoundError as err:
        return None, (f"{err.name} is not installed (set-up installs liger-kernel on CUDA boxes; "
                      "Triton comes with CUDA builds of torch)")
    except Exception as err:  # Triton failing to find a driver or a compiler
        return None, f"liger-kernel did not load: {type(err).__name__}: {err}"


def apply(model: Any, device: str, setting: str = "auto") -> str:
    """Rebind `model`'s norms, MLPs and RoPE to Liger's kernels where that is possible and
    return one line for the job log that says what was done or why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = model_type if model_type in FAMILIES else None
    if setting == "off":
        _rope.pop(family or "", None)  # a wrapper from an earlier model in this process stays plain
        return "fused kernels off: set in the config (fused_kernels)"
    if not str(device).startswith("cuda"):
        return "fused kernels off: Triton kernels run on CUDA only"
    if family is None:
        return f"fused kernels off: no Llama-layout kernels for model type {model_type!r}"
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"fused kernels off: the MLP's activation is {act!r}, not SiLU"
    functional, why = _liger()
    if functional is None:
        return f"fused kernels off: {why}"
    norms, mlps = bind(model, functional)
    wrap_rope(family, functional)
    version = package_version("liger-kernel") or "(unknown version)"
    return (f"fused kernels: liger-kernel {version}: RMSNorm x{norms}, SwiGLU x{mlps}, RoPE "
            "(Triton, CUDA tensors only)")


def bind(model: Any, functional: Any) -> tuple[int, int]:
    """Rebind every RMSNorm and gated MLP of `model` (one instance) to the fused kernels."""
    norms = mlps = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward(type(module).forward, functional), module)
            norms += 1
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj",
                                                                         "down_proj")):
            module.forward = types.MethodType(_mlp_forward(type(module).forward, functional), module)
            mlps += 1
    return norms, mlps


def _norm_forward(plain: Any, functional: Any) -> Any:
    def forward(self: Any, hidden: Any) -> Any:
        if not on_gpu(hidden):
            return plain(self, hidden)
        # casting "llama": the variance in fp32, the product with the weight in the input dtype
        return functional.liger_rms_norm(hidden, self.weight, self.variance_epsilon, 0.0, "llama", True)
    return forward


def _mlp_forward(plain: Any, functional: Any) -> Any:
    def forward(self: Any, x: Any) -> Any:
        if not on_gpu(x):
            return plain(self, x)
        return self.down_proj(functional.liger_swiglu(self.gate_proj(x), self.up_proj(x)))
    return forward


def wrap_rope(family: str, functional: Any) -> None:
    """Wrap `modeling_<family>.apply_rotary_pos_emb` (the attention looks it up there on every
    call) once, so CUDA tensors take the kernel `apply` last chose for the family (`_rope`) and
    the rest transformers' function."""
    _rope[family] = functional
    module: Any = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    current = module.apply_rotary_pos_emb
    if getattr(current, "appliance_plain", None) is not None:
        return
    plain = current

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, position_ids: Any = None,
                             unsqueeze_dim: int = 1) -> Any:
        fused = _rope.get(family)
        # Liger's kernel assumes the [batch, heads, seq, dim] layout that unsqueeze_dim 1 means
        if fused is not None and unsqueeze_dim == 1 and on_gpu(q):
            return fused.liger_rope(q, k, cos, sin, position_ids, unsqueeze_dim)
        return plain(q, k, cos, sin, position_ids=position_ids, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.appliance_plain = plain  # type: ignore[attr-defined]
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
