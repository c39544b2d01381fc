"""Memory planner: will this training run fit on this GPU (or on a named one), and if not, what is
the largest batch x sequence that does?

Peak GPU memory of a QLoRA step of the engine in `appliance/stages/train/recipe.py`:
- weights: NF4 linear layers at 4.125 bits/param (4-bit codes, 8-bit block scales with double
  quantization) plus 0.5 bits/param for the block scales the engine keeps unpacked in fp32
  (`unpack_scales`), LoRA parameters in fp32, embeddings (and an untied head) in the compute dtype;
- per token: the checkpointed hidden states and one layer's recomputed activations, and, for the
  chunked loss, the logits of at most `loss_chunk(vocab)` tokens at a time;
- paged 8-bit AdamW keeps 2 bytes per LoRA parameter in managed memory (outside torch's allocator),
  plain AdamW 8 bytes plus 4 for the gradient; plus the CUDA context.

Beyond the fitted points' longest step (8,192 tokens) each further token costs at least what it
cost on a measured Qwen2.5-7B sweep to 24k tokens (`LONG_TOKEN_BYTES`): the fit alone
underestimated that shape's long sequences by up to 22%. The coefficients marked "fitted" come
from least squares over the peaks measured on an H100
(`bench/calibrate_planner.py`: 21 points, 3 shapes, vocabularies of 49k-152k, every token trained;
stored in `appliance/data/planner-calibration.json`), weighted by relative error; every recorded
point is predicted within 8% (the peak is really the larger of the loss phase and the layers'
backward, which a sum only approximates); the tests check every recorded point and two
out-of-sample points from `bench/train_throughput.py` (the 1B and 7B shapes). Training runs with
`expandable_segments`, so reserved memory stays close to allocated, as it was measured.
The engine since (Liger's kernels, seeded dropout) is predicted out of sample within -2%..+12% on the
same grid measured again and on two 7B sweeps to 24k tokens (bench/results/train-throughput-h100.md
v4b; a refit on them was worse). Dropout needs no term: on CUDA the fused layer keeps no masks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.errors import ValidationError
from appliance.gpus import GpuStatus, has_nvidia_smi, read_gpus
from appliance.stages.train.config import TrainConfig

GIB = 2**30
NF4_BYTES_PER_PARAM = 4.125 / 8 + 4 / (64 * 256)  # codes + 8-bit scales + fp32 second-level scales
LOSS_CHUNK = 1024           # must match appliance.stages.train.recipe.LOSS_CHUNK (a test checks)
LOSS_LOGITS = 1 << 26       # logit entries of one loss chunk at most (256 MiB in fp32)
UNPACKED_SCALE_BYTES = 4 / 64  # per NF4 parameter when its block scales are kept in fp32
EMBED_BYTES = 2.796         # per embedding parameter (fitted; 2 for bf16, plus the input-grad hook)
HIDDEN_LAYER_BYTES = 0.671  # per token per hidden unit per layer (fitted; checkpointed inputs)
HIDDEN_BYTES = 58.75        # per token per hidden unit (fitted; one layer recomputed, final states)
LOGIT_BYTES = 11.15         # per chunk token per vocabulary entry (fitted; logits, fp32 copy, grads)
CONSTANT_BYTES = 87.8e6     # cuBLAS workspaces and small buffers inside the allocator (fitted)
FIT_TOKENS = 8192           # the longest step (batch x seq) among the fitted points
# Beyond FIT_TOKENS each further token costs at least this, per hidden unit: the slope of the
# Qwen2.5-7B shape's batch-1 sweep from 2k to 24k tokens (bench/results/max-seq-qwen7b-h100-v2.json:
# 0.472 GiB per 1k tokens, a straight line), the steepest measured. The fit alone, made on small
# shapes at <= 8k tokens, put it at 77.5 and passed 7B runs that did not fit (docs/PITFALLS.md).
LONG_TOKEN_BYTES = 138.15
CUDA_CONTEXT_BYTES = 0.5 * GIB
HEADROOM = 0.10             # fragmentation the allocator may still add (reserved over allocated)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    compute_capability: str


TARGETS = {
    "t4-16gb": GpuSpec("NVIDIA T4 16GB", 15.0, "7.5"),
    "l4-24gb": GpuSpec("NVIDIA L4 24GB", 22.0, "8.9"),
    "a10-24gb": GpuSpec("NVIDIA A10 24GB", 22.0, "8.6"),
    "a100-40gb": GpuSpec("NVIDIA A100 40GB", 39.4, "8.0"),
    "a100-80gb": GpuSpec("NVIDIA A100 80GB", 79.2, "8.0"),
    "h100-80gb": GpuSpec("NVIDIA H100 80GB", 79.2, "9.0"),
}


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(vocab=int(config["vocab_size"]), hidden=hidden,
                       intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads),
                       tied=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"config.json lacks what the planner needs: {exc}") from None

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


@dataclass(frozen=True)
class Estimate:
    weights: float
    activations: float
    optimizer: float
    context: float
    calibrated: bool
    eval_activations: float = 0.0  # the eval pass's (no gradients): a bound, see `estimate`

    @property
    def allocated(self) -> float:
        """What torch's allocator peaks at (what calibration measured)."""
        return self.weights + self.activations

    @property
    def total(self) -> float:
        return self.allocated * (1 + HEADROOM) + self.optimizer + self.context

    @property
    def eval_total(self) -> float:
        """The eval pass's peak (bounded above), with the weights and optimizer state in place."""
        return ((self.weights + self.eval_activations) * (1 + HEADROOM) + self.optimizer
                + self.context)


def loss_chunk(vocab: int) -> int:
    """Trained tokens whose logits exist at once: 1024, halved until a chunk's fp32 logits stay
    within LOSS_LOGITS entries (a 152k vocabulary gets 256)."""
    chunk = LOSS_CHUNK
    while chunk > 128 and chunk * vocab > LOSS_LOGITS:
        chunk //= 2
    return chunk


def lora_params(shape: Shape, rank: int) -> int:
    return shape.layers * sum(rank * (i + o) for i, o in shape.linear_shapes())


def weight_bytes(shape: Shape, cfg: TrainConfig) -> float:
    linear = shape.layers * sum(i * o for i, o in shape.linear_shapes())
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    per_linear = NF4_BYTES_PER_PARAM if cfg.quantization == "nf4" else 2
    if cfg.quantization == "nf4" and cfg.fused_lora and cfg.unpack_scales:
        per_linear += UNPACKED_SCALE_BYTES
    return linear * per_linear + embeddings * EMBED_BYTES + lora_params(shape, cfg.lora_r) * 4


def estimate(shape: Shape, cfg: TrainConfig, batch: int, seq: int, *, gpu: bool = True) -> Estimate:
    tokens = batch * seq
    # without checkpointing every layer keeps its activations: rough (uncalibrated) estimate
    per_layer = HIDDEN_LAYER_BYTES if cfg.gradient_checkpointing else HIDDEN_BYTES
    offloaded = cfg.offload_activations and gpu  # checkpointed inputs in host memory (offload.py)
    prefetched = 2.0 if offloaded else 0.0  # the one input copied back ahead of its backward
    if offloaded:
        per_layer = 0.0
    per_token = per_layer * shape.layers + HIDDEN_BYTES + prefetched
    beyond = max(0, tokens - FIT_TOKENS)
    # the sweep kept each layer's bf16 input on the GPU (2 bytes per hidden unit per layer)
    floor = LONG_TOKEN_BYTES - (2.0 * shape.layers - prefetched if offloaded else 0.0)
    activations = (shape.hidden * ((tokens - beyond) * per_token + beyond * max(per_token, floor))
                   + LOGIT_BYTES * min(tokens, loss_chunk(shape.vocab)) * shape.vocab)
    n_lora = lora_params(shape, cfg.lora_r)
    paged = cfg.optimizer == "paged_adamw_8bit" or (cfg.optimizer == "auto" and gpu)
    optimizer = 2 * n_lora if paged else 12 * n_lora
    # The eval pass (recipe.evaluate: the same batches and chunked loss, under no_grad) keeps no
    # layer's inputs for a backward and no gradients: at most one layer's activations at a time
    # (bounded by the recomputed layer's HIDDEN_BYTES) and one loss chunk (bounded by LOGIT_BYTES,
    # which counts the gradients too). A bound, not a fit: it is never above the step's.
    eval_activations = (tokens * shape.hidden * HIDDEN_BYTES
                        + LOGIT_BYTES * min(tokens, loss_chunk(shape.vocab)) * shape.vocab)
    return Estimate(weights=weight_bytes(shape, cfg), activations=activations + CONSTANT_BYTES,
                    optimizer=optimizer, context=CUDA_CONTEXT_BYTES,
                    calibrated=(cfg.gradient_checkpointing and cfg.quantization == "nf4"
                                and not cfg.offload_activations),
                    eval_activations=min(eval_activations, activations) + CONSTANT_BYTES)


@dataclass(frozen=True)
class Plan:
    target: GpuSpec
    estimate: Estimate
    fits: bool
    proposal: tuple[int, int] | None  # (batch, seq) that fits, when the config does not

    def describe(self, cfg: TrainConfig) -> str:
        e = self.estimate
        lines = [f"memory plan for {self.target.name} ({self.target.memory_gib:.1f} GiB usable): "
                 f"{e.total / GIB:.2f} GiB at batch {cfg.batch_size} x seq {cfg.max_seq_len} "
                 f"(weights {e.weights / GIB:.2f}, activations {e.activations / GIB:.2f}, "
                 f"optimizer {e.optimizer / GIB:.2f}, CUDA context {e.context / GIB:.2f})"
                 + ("" if e.calibrated else "; rough: calibrated for NF4 with gradient checkpointing"
                    + (", without activation offload" if cfg.offload_activations else ""))]
        eval_pass = f"its eval pass (no gradients) at most {e.eval_total / GIB:.2f} GiB"
        if self.fits:
            lines.append(f"fits; {eval_pass}")
        elif self.proposal:
            b, s = self.proposal
            accum = max(1, round(cfg.batch_size * cfg.grad_accum / b))
            lines.append(f"does NOT fit; largest that does: batch_size={b} max_seq_len={s} "
                         f"(grad_accum={accum} keeps the effective batch)")
        else:
            lines.append(f"does NOT fit even at batch 1 x 256 tokens (the weights alone take "
                         f"{e.weights / GIB:.2f} GiB): lower lora_r, or pick a smaller model or a "
                         "bigger GPU")
        if not self.fits:
            lines.append(eval_pass)
        if cfg.cuda_graphs == "on":
            lines.append("cuda_graphs: not counted above: the graphs keep their step's memory in a "
                         "pool (+9% at 1B, measured on the bench's version) and a new shape's "
                         "warm-up runs beside it; leave room")
        return "\n".join(lines)


def plan(shape: Shape, cfg: TrainConfig, target: GpuSpec) -> Plan:
    budget = target.memory_gib * GIB
    est = estimate(shape, cfg, cfg.batch_size, cfg.max_seq_len)
    if est.total <= budget:
        return Plan(target, est, True, None)
    return Plan(target, est, False, propose(shape, cfg, budget))


def propose(shape: Shape, cfg: TrainConfig, budget: float) -> tuple[int, int] | None:
    """Keep the sequence length and lower the batch first (truncating conversations changes what
    is learned); only at batch 1 shorten the sequence, in steps of 256."""
    def fits(batch: int, seq: int) -> bool:
        return estimate(shape, cfg, batch, seq).total <= budget

    for batch in range(cfg.batch_size, 0, -1):
        if fits(batch, cfg.max_seq_len):
            return batch, cfg.max_seq_len
    for seq in [*range(cfg.max_seq_len // 256 * 256, 0, -256), min(cfg.max_seq_len, 128)]:
        if seq < cfg.max_seq_len and fits(1, seq):
            return 1, seq
    return None


def target_named(name: str) -> GpuSpec:
    if name not in TARGETS:
        raise ValidationError(f"unknown --target {name!r}", hint=f"known: {', '.join(TARGETS)}")
    return TARGETS[name]


def spec_for(gpu: GpuStatus) -> GpuSpec:
    """A GPU as nvidia-smi reports it, with the memory free on it now (what other processes, a
    server or a job, leave us). Drivers too old to report the compute capability get 8.0."""
    return GpuSpec(f"{gpu.name} (free now)", gpu.free_gib, gpu.compute_capability or "8.0")


def detected_target() -> GpuSpec | None:
    """The GPU a run started here would train on (the first one), with its memory free now; None
    without one.

    Asks nvidia-smi (milliseconds, no torch import); an nvidia-smi that finds no GPU, or fails, means
    none. torch is imported only where nvidia-smi is absent, or where CUDA_VISIBLE_DEVICES is set:
    nvidia-smi ignores that variable, so only CUDA knows which GPU is then device 0."""
    if has_nvidia_smi() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        gpus, _ = read_gpus()
        return spec_for(gpus[0]) if gpus else None
    return _torch_target()


def _torch_target() -> GpuSpec | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    free, _ = torch.cuda.mem_get_info(0)  # what other processes (a server, a job) leave us
    return GpuSpec(f"{props.name} (free now)", free / GIB, f"{props.major}.{props.minor}")


def model_shape(model_path: Path) -> Shape:
    return Shape.from_config(json.loads((model_path / "config.json").read_text(encoding="utf-8")))


def calibration() -> dict[str, Any]:
    path = resources.files("appliance") / "data" / "planner-calibration.json"
    return json.loads(path.read_text(encoding="utf-8"))
