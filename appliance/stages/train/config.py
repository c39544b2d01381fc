"""Training configuration: a dataclass, shipped TOML recipes, and validation that reports every
problem at once, each with its key and the allowed range.

Recipes live in `appliance/recipes/<name>.toml`; each starts with a comment giving the command that
runs it. Any key can be overridden on the command line with `--set key=value`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from appliance import cpus
from appliance.errors import ValidationError


@dataclass
class TrainConfig:
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # base model
    quantization: str = "nf4"            # nf4 (QLoRA, double quant) | none (bf16/fp32 LoRA)
    compute_dtype: str = "auto"          # auto: bf16 on GPUs >= 8.0, fp16 on a T4; on the CPU bf16
                                         # only with native bf16 (avx512_bf16/amx_bf16), else fp32
    gradient_checkpointing: bool = True
    offload_activations: bool = False    # checkpointed layer inputs in host memory (train/offload.py)
    fused_lora: bool = True              # one autograd function per LoRA layer (train/fastlora.py)
    unpack_scales: bool = True           # NF4 block scales kept in fp32: +0.06 bytes/param, faster steps
    fused_kernels: str = "auto"          # auto: Liger's RMSNorm/RoPE/SwiGLU on CUDA when installed
    cuda_graphs: str = "off"             # on: each batch shape's forward + backward one CUDA graph
                                         # (train/graphed.py; batches padded to a few shapes)
    # optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 200
    batch_size: int = 4
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    optimizer: str = "auto"              # auto: paged 8-bit AdamW on GPU, AdamW on CPU
    max_seq_len: int = 1024
    # evaluation and checkpoints
    eval_every: int = 50
    eval_batches: int = 0                # 0: the whole eval split
    save_every: int = 50
    early_stopping_patience: int = 0     # evals without improvement before stopping; 0: never
    seed: int = 0
    # distribution
    devices: int = 1                     # processes (GPUs) in data parallel (DDP through torchrun)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RANGES: dict[str, tuple[float, float]] = {
    "lora_r": (1, 1024), "lora_alpha": (1e-3, 1e4), "lora_dropout": (0, 0.9),
    "learning_rate": (1e-7, 1.0), "weight_decay": (0, 1.0), "warmup_steps": (0, 1e6),
    "max_steps": (1, 1e7), "batch_size": (1, 4096), "grad_accum": (1, 4096),
    "max_grad_norm": (0, 1e4), "max_seq_len": (16, 1 << 20), "eval_every": (1, 1e7),
    "eval_batches": (0, 1e7), "save_every": (1, 1e7), "early_stopping_patience": (0, 1e4),
    "seed": (0, 2**32 - 1), "devices": (1, 64),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "quantization": ("nf4", "none"),
    "compute_dtype": ("auto", "bf16", "fp16", "fp32"),
    "optimizer": ("auto", "adamw", "paged_adamw_8bit"),
    "fused_kernels": ("auto", "off"),
    "cuda_graphs": ("off", "on"),
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_value(key: str, value: Any) -> str | None:
    default = getattr(TrainConfig(), key)
    if key == "target_modules":
        ok = value == "all-linear" or (isinstance(value, list) and value
                                       and all(isinstance(v, str) for v in value))
        return None if ok else f"{key}: must be \"all-linear\" or a list of module names, got {value!r}"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{key}: must be true or false, got {value!r}"
    if key in CHOICES:
        return None if value in CHOICES[key] else \
            f"{key}: must be one of {', '.join(CHOICES[key])}, got {value!r}"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int) and not (numeric and float(value).is_integer()):
        return f"{key}: must be an integer, got {value!r}"
    if not numeric:
        return f"{key}: must be a number, got {value!r}"
    low, high = RANGES[key]
    if not low <= value <= high:
        return f"{key}: {value} is out of range [{_num(low)}, {_num(high)}]"
    return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def validate(values: dict[str, Any], *, source: str = "config",
             context_length: int | None = None) -> TrainConfig:
    """Build a TrainConfig, collecting every problem into one ValidationError."""
    problems = [f"{key}: unknown key (known: {', '.join(FIELDS)})" for key in values
                if key not in FIELDS]
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key in FIELDS:
            problem = _check_value(key, value)
            if problem:
                problems.append(problem)
            else:
                clean[key] = int(value) if isinstance(getattr(TrainConfig(), key), int) \
                    and not isinstance(value, bool) else value
    config = TrainConfig(**clean)
    seq_ok = "max_seq_len" in clean or "max_seq_len" not in values
    if context_length and seq_ok and config.max_seq_len > context_length:
        problems.append(f"max_seq_len: {config.max_seq_len} is longer than the model's context "
                        f"({context_length})")
    if config.offload_activations and not config.gradient_checkpointing:
        problems.append("offload_activations: needs gradient_checkpointing = true (it moves the "
                        "layer inputs that checkpointing keeps)")
    if config.offload_activations and config.devices > 1:
        problems.append("offload_activations: not with devices > 1 (DDP cannot follow its "
                        "re-entrant checkpoint): use one GPU, or turn it off")
    if config.cuda_graphs == "on":
        problems += [f"cuda_graphs: {why}" for why in _graph_conflicts(config)]
    if problems:
        raise ValidationError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(problems),
                              title="Invalid training config")
    return config


def _graph_conflicts(config: TrainConfig) -> list[str]:
    """What a CUDA-graphed step (train/graphed.py) cannot hold, as config problems."""
    conflicts = []
    if config.devices > 1:
        conflicts.append("not with devices > 1 (DDP's gradient hooks run between launches a graph "
                         "replays as one): use one GPU, or turn it off")
    if not config.fused_lora and config.lora_dropout > 0:
        conflicts.append("needs fused_lora = true with lora_dropout > 0 (peft's dropout cannot "
                         "draw the same masks again in checkpointing's recompute inside a graph)")
    return conflicts


def resolve_compute_dtype(cfg: TrainConfig, cuda_capability: tuple[int, int] | None,
                          cpu: cpus.CpuInfo | None = None) -> tuple[str, str]:
    """The compute dtype ("bf16", "fp16" or "fp32") a run uses and why, in one line for the job
    log. `cuda_capability` is the GPU's (major, minor), None on the CPU; `cpu` is read from
    /proc/cpuinfo when not given (and only when it matters). An explicit compute_dtype wins."""
    if cfg.compute_dtype != "auto":
        why = f"compute dtype {cfg.compute_dtype}: set in the config"
        if cuda_capability is None and cfg.compute_dtype == "bf16":
            cpu = cpu if cpu is not None else cpus.read_cpu()
            if not cpu.native_bf16:
                why += (f" (this CPU has no native bf16: steps may run {cpus.BF16_SLOWDOWN}; "
                        "compute_dtype=auto picks fp32 here)")
        return cfg.compute_dtype, why
    if cuda_capability is not None:
        major, minor = cuda_capability
        if major >= 8:
            return "bf16", f"compute dtype bf16: GPU compute capability {major}.{minor} has bf16"
        return "fp16", f"compute dtype fp16: GPU compute capability {major}.{minor} has no bf16"
    if cfg.quantization != "nf4":
        return "fp32", "compute dtype fp32: full-precision LoRA (quantization none) on the CPU"
    return cpus.cpu_compute_dtype(cpu)


def parse_override(text: str, flag: str = "") -> tuple[str, Any]:
    """`key=value` (a command line's `flag`, named in the error; the TUI's field names itself); the
    value is read as TOML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValidationError(f"{flag} {text!r}: expected key=value".lstrip())
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def recipe_names() -> list[str]:
    folder = resources.files("appliance") / "recipes"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Values from a shipped recipe name or a TOML file path (not yet validated)."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = resources.files("appliance") / "recipes" / f"{name_or_path}.toml"
        if not shipped.is_file():
            raise ValidationError(f"no recipe {name_or_path!r}",
                                  hint=f"shipped recipes: {', '.join(recipe_names())}; or give a "
                                       ".toml file")
        path = Path(str(shipped))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{path}: not valid TOML: {exc}") from None
