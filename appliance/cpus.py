"""This machine's CPU as /proc/cpuinfo describes it, without importing torch: its model name and
whether it computes bf16 natively, which decides the compute dtype of training on the CPU.

On an x86 CPU without AVX512-BF16 or AMX-BF16 (an AVX2-only box), torch's bf16 matmul is emulated
and ran ~28x slower than fp32 (0.8 vs 22.6 GFLOP/s, one thread, 384x576 @ 576x1536), so training
there computes in fp32. `torch.backends.cpu.get_cpu_capability()` cannot tell: it names the vector
width ATen dispatches to ("AVX2", "AVX512"), and an AVX512 CPU without bf16 (Skylake, Cascade Lake)
says "AVX512" too; `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is true on any AVX512BW CPU, where
oneDNN emulates bf16. The kernel's own flags are the evidence: `avx512_bf16` (Cooper Lake, Sapphire
Rapids, Zen 4) or `amx_bf16` (Sapphire Rapids and later). Only an x86 `flags` line is read, so an
ARM CPU (its `Features` line) or an unreadable file means no native bf16: fp32, the safe default.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_SLOWDOWN = "~28x slower than fp32 (measured on an AVX2 CPU)"


@dataclass(frozen=True)
class CpuInfo:
    model: str | None            # "Intel(R) Xeon(R) Processor", None when unknown
    flags: frozenset[str]        # the x86 feature flags; empty when unknown or not x86
    problem: str = ""            # why the flags are unknown ("" when they were read)

    @property
    def bf16_flags(self) -> list[str]:
        """The native-bf16 flags this CPU has, in NATIVE_BF16_FLAGS order."""
        return [f for f in NATIVE_BF16_FLAGS if f in self.flags]

    @property
    def native_bf16(self) -> bool:
        return bool(self.bf16_flags)


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from /proc/cpuinfo text."""
    model: str | None = None
    flags: frozenset[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    if flags is None:
        return CpuInfo(model, frozenset(), f"no x86 flags line in {CPUINFO} ({platform.machine()})")
    return CpuInfo(model, flags)


def read_cpu(path: Path = CPUINFO) -> CpuInfo:
    """This machine's CPU; an unreadable file gives no flags and says why."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return CpuInfo(None, frozenset(), f"{path} unreadable ({exc.strerror or exc})")
    return parse_cpuinfo(text)


def cpu_compute_dtype(cpu: CpuInfo | None = None) -> tuple[str, str]:
    """("bf16" or "fp32", why in one line) for training on this CPU."""
    cpu = cpu if cpu is not None else read_cpu()
    if cpu.native_bf16:
        return "bf16", f"compute dtype bf16: this CPU has native bf16 ({', '.join(cpu.bf16_flags)})"
    if cpu.problem:
        return "fp32", (f"compute dtype fp32: native bf16 unknown ({cpu.problem}); fp32 is the safe "
                        f"default (bf16 may run {BF16_SLOWDOWN})")
    return "fp32", (f"compute dtype fp32: this CPU has no native bf16 (no "
                    f"{'/'.join(NATIVE_BF16_FLAGS)} flag); bf16 would run {BF16_SLOWDOWN}")
