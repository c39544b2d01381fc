"""The compute dtype of training on the CPU: bf16 only where the CPU computes it natively
(avx512_bf16 or amx_bf16 in /proc/cpuinfo), fp32 otherwise (an AVX2-only CPU emulates bf16 ~28x
slower), fp32 when the flags cannot be read; an explicit compute_dtype wins; the choice is said."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import cpus
from appliance.stages.train.config import TrainConfig, resolve_compute_dtype, validate

BASE_FLAGS = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma sse4_1 sse4_2 avx"


def cpuinfo(flags: str, model: str = "Intel(R) Xeon(R) Processor", processors: int = 2) -> str:
    """/proc/cpuinfo as Linux writes it on x86: one block per logical CPU."""
    block = (f"processor\t: {{n}}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
             f"model name\t: {model}\nflags\t\t: {flags}\nbugs\t\t: spectre_v1\n\n")
    return "".join(block.format(n=n) for n in range(processors))


AVX2_ONLY = cpuinfo(f"{BASE_FLAGS} avx2 bmi2", model="AMD EPYC 7B12")
AVX512_NO_BF16 = cpuinfo(f"{BASE_FLAGS} avx2 avx512f avx512bw avx512vl avx512_vnni")  # Cascade Lake
COOPER_LAKE = cpuinfo(f"{BASE_FLAGS} avx2 avx512f avx512bw avx512_bf16")
AMX_ONLY = cpuinfo(f"{BASE_FLAGS} avx2 amx_bf16 amx_tile amx_int8")
ARM = ("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
       "atomics fphp asimdhp cpuid asimdrdm bf16 i8mm\nCPU implementer\t: 0x41\n\n")


# -- reading the flags -------------------------------------------------------------------------
def test_avx512_bf16_is_native_bf16() -> None:
    cpu = cpus.parse_cpuinfo(COOPER_LAKE)
    assert cpu.native_bf16 and cpu.bf16_flags == ["avx512_bf16"]
    assert cpu.model == "Intel(R) Xeon(R) Processor" and not cpu.problem
    assert cpus.cpu_compute_dtype(cpu)[0] == "bf16"


def test_amx_bf16_alone_is_native_bf16() -> None:
    cpu = cpus.parse_cpuinfo(AMX_ONLY)
    assert cpu.bf16_flags == ["amx_bf16"]
    dtype, why = cpus.cpu_compute_dtype(cpu)
    assert dtype == "bf16" and "amx_bf16" in why


@pytest.mark.parametrize("text", [AVX2_ONLY, AVX512_NO_BF16], ids=["avx2", "avx512-without-bf16"])
def test_no_bf16_flag_means_fp32_and_says_why(text: str) -> None:
    cpu = cpus.parse_cpuinfo(text)
    assert "avx2" in cpu.flags and not cpu.native_bf16
    dtype, why = cpus.cpu_compute_dtype(cpu)
    assert dtype == "fp32"
    assert why.startswith("compute dtype fp32: this CPU has no native bf16")
    assert "avx512_bf16" in why and "amx_bf16" in why and "slower" in why


def test_a_non_x86_cpu_gets_fp32_even_with_an_arm_bf16_feature() -> None:
    cpu = cpus.parse_cpuinfo(ARM)
    assert cpu.flags == frozenset() and cpu.problem
    assert cpus.cpu_compute_dtype(cpu)[0] == "fp32"


def test_an_unreadable_cpuinfo_gets_fp32_and_says_why(tmp_path: Path) -> None:
    cpu = cpus.read_cpu(tmp_path / "no-such-cpuinfo")
    assert not cpu.native_bf16 and "unreadable" in cpu.problem
    dtype, why = cpus.cpu_compute_dtype(cpu)
    assert dtype == "fp32" and "unreadable" in why and "safe default" in why


def test_read_cpu_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(AMX_ONLY, encoding="utf-8")
    assert cpus.read_cpu(path).native_bf16
    path.write_text(AVX2_ONLY, encoding="utf-8")
    assert cpus.read_cpu(path) == cpus.parse_cpuinfo(AVX2_ONLY)
    assert cpus.read_cpu(path).model == "AMD EPYC 7B12"


# -- resolving compute_dtype = "auto" ----------------------------------------------------------
def test_auto_on_the_cpu_follows_the_flags() -> None:
    cfg = TrainConfig()  # the defaults: NF4, compute_dtype auto
    assert resolve_compute_dtype(cfg, None, cpus.parse_cpuinfo(AVX2_ONLY))[0] == "fp32"
    assert resolve_compute_dtype(cfg, None, cpus.parse_cpuinfo(COOPER_LAKE))[0] == "bf16"


def test_auto_on_the_cpu_reads_proc_cpuinfo_when_not_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "read_cpu", lambda path=cpus.CPUINFO: cpus.parse_cpuinfo(AVX2_ONLY))
    assert resolve_compute_dtype(TrainConfig(), None)[0] == "fp32"
    monkeypatch.setattr(cpus, "read_cpu", lambda path=cpus.CPUINFO: cpus.parse_cpuinfo(AMX_ONLY))
    assert resolve_compute_dtype(TrainConfig(), None)[0] == "bf16"


def test_full_precision_lora_on_the_cpu_stays_fp32() -> None:
    cfg = validate({"quantization": "none"})
    assert resolve_compute_dtype(cfg, None, cpus.parse_cpuinfo(COOPER_LAKE))[0] == "fp32"


def test_auto_on_a_gpu_ignores_the_cpu() -> None:
    avx2 = cpus.parse_cpuinfo(AVX2_ONLY)
    assert resolve_compute_dtype(TrainConfig(), (8, 0), avx2)[0] == "bf16"
    dtype, why = resolve_compute_dtype(TrainConfig(), (7, 5), avx2)
    assert dtype == "fp16" and "7.5" in why


@pytest.mark.parametrize("asked", ["bf16", "fp32", "fp16"])
def test_an_explicit_compute_dtype_wins(asked: str) -> None:
    cfg = validate({"compute_dtype": asked})
    for cpu in (AVX2_ONLY, COOPER_LAKE):
        dtype, why = resolve_compute_dtype(cfg, None, cpus.parse_cpuinfo(cpu))
        assert dtype == asked and "set in the config" in why
    assert resolve_compute_dtype(cfg, (7, 5))[0] == asked


def test_bf16_asked_on_a_cpu_without_it_warns() -> None:
    cfg = validate({"compute_dtype": "bf16"})
    assert "no native bf16" in resolve_compute_dtype(cfg, None, cpus.parse_cpuinfo(AVX2_ONLY))[1]
    assert "no native bf16" not in resolve_compute_dtype(cfg, None, cpus.parse_cpuinfo(AMX_ONLY))[1]


# -- what the training job does with it (torch, no model) --------------------------------------
def test_pick_device_on_an_avx2_cpu_gives_fp32_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from appliance.stages.train import recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpus, "read_cpu", lambda path=cpus.CPUINFO: cpus.parse_cpuinfo(AVX2_ONLY))
    said: list[str] = []
    assert recipe.pick_device(TrainConfig(), said.append) == ("cpu", torch.float32)
    assert len(said) == 1 and said[0].startswith("compute dtype fp32: this CPU has no native bf16")
    monkeypatch.setattr(cpus, "read_cpu", lambda path=cpus.CPUINFO: cpus.parse_cpuinfo(COOPER_LAKE))
    assert recipe.pick_device(TrainConfig()) == ("cpu", torch.bfloat16)
