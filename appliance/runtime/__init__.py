"""The offline runtime: chat engines over exported artifacts, the console chat and the HTTP server.

Torch-free by design: a served GGUF needs llama-cpp-python, an ONNX artifact onnxruntime, numpy and
tokenizers; neither pulls in torch or transformers, so a server starts fast and stays small.
"""

from __future__ import annotations

import argparse

DEFAULT_PORT = 8321  # the API server's; here so the CLI, the units and the TUI import nothing heavy

# Where an engine computes: "auto" puts every layer on the GPU when the runtime has one (a CUDA
# llama.cpp build, onnxruntime-gpu) and the models fit, "gpu" requires it, "cpu" never uses it.
DEVICES = ("auto", "gpu", "cpu")


def gpu_wanted(device: str) -> bool | None:
    """The engines' `gpu` argument for a device choice: None (auto), True (gpu), False (cpu)."""
    return {"auto": None, "gpu": True, "cpu": False}[device]


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """`--gpu` / `--cpu` on a command that opens engines (dest `device`, default "auto")."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpu", dest="device", action="store_const", const="gpu",
                       help="require the GPU (an error if the runtime has none or the models do not fit)")
    group.add_argument("--cpu", dest="device", action="store_const", const="cpu",
                       help="compute on the CPU even when a GPU is there")
    parser.set_defaults(device="auto")
