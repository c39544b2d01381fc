"""Package versions, read from installed metadata without importing the (heavy) packages.

Recorded in every manifest so an artifact says which stack made it.
"""

from __future__ import annotations

import platform
from importlib import metadata

STACK = (
    "torch", "transformers", "tokenizers", "peft", "bitsandbytes", "accelerate", "optimum",
    "optimum-onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda",
    "onnx", "onnx-ir", "llama_cpp_python",
    "gguf", "safetensors", "huggingface-hub", "textual", "numpy", "sentencepiece",
)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def stack_versions() -> dict[str, str | None]:
    """Versions of the pinned stack; None for what is not installed."""
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "appliance": package_version("appliance"),
    }
    versions.update({name: package_version(name) for name in STACK})
    return versions


def installed_versions() -> dict[str, str]:
    """Only the installed ones (what goes into a manifest)."""
    return {k: v for k, v in stack_versions().items() if v is not None}

