"""onnxruntime-genai's generator behind `OnnxLM`'s step interface: how ONNX runs on CUDA.

Why: on CUDA an ONNX decoder run by plain onnxruntime is host-bound (a launch per node, shape
arithmetic on the CPU between the kernels); genai's runtime keeps one KV buffer of the context's
length on the device (past and present share it) and replays the one-token step as a CUDA graph:
on an H200 a 0.5B fp16 model decoded at 889 tokens/s through it against 69-95 through our own loop
(bench/results/onnx-gpu-h200.md). It runs the graph genai's model builder made (`export_onnx`'s
fp16, the folder holds genai_config.json).

What stays ours: the engine's loop (prompt-cache reuse, the sampler with every option the API
takes, stops, streaming) calls `forward`/`decode` as on the CPU. genai only runs the graph: a
`GenaiCache` is a length, and a step that does not continue where the generator stands rewinds it
first. Only the last position's logits come back (float32). Scoring (whole-sequence logits) stays
with `OnnxLM`, which runs the same graph on the CPU.

genai logs telemetry through onnxruntime's 1DS store on Linux too (`onnxruntime-genai.db` under
~/.cache, DNS lookups): what stops it is onnxruntime's opt-out in the environment (appliance.offline,
inherited by every child); `og.disable_telemetry_events()` alone did not, and is called as well
(tests/integration/test_native_telemetry.py holds a generator under strace).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ApplianceError, ValidationError
from export.onnx import CUDA_HINT, GENAI_CONFIG, OnnxLM


@dataclass(frozen=True)
class GenaiCache:
    """How many positions the generator holds for the conversation being continued."""

    length: int

    def cut(self, keep: int) -> GenaiCache:
        return GenaiCache(keep)


def usable(folder: Path) -> bool:
    """A genai-built folder and a genai runtime that has CUDA here."""
    if not (Path(folder) / GENAI_CONFIG).is_file():
        return False
    try:
        import onnxruntime_genai as og
    except ImportError:
        return False
    return bool(og.is_cuda_available())


class GenaiLM(OnnxLM):
    """The folder's graph on one GPU through genai; tokenizer, config and stop ids as `OnnxLM`."""

    def __init__(self, folder: Path, context_length: int, device: str = "cuda",
                 cuda_graph: bool = True) -> None:
        import onnxruntime_genai as og

        og.disable_telemetry_events()
        self.folder = Path(folder)
        self.device = device
        self.bind = False
        self.providers = ["CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"]
        self.cuda_graph = cuda_graph and device == "cuda"
        self._tokenizer: Any = None
        config = og.Config(str(self.folder))
        config.clear_providers()
        if device == "cuda":
            config.append_provider("cuda")
            config.set_provider_option("cuda", "enable_cuda_graph", "1" if self.cuda_graph else "0")
        try:
            self.model = og.Model(config)
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=context_length, do_sample=False)
            self.generator = og.Generator(self.model, params)
        except Exception as exc:  # genai raises its own RuntimeError (OgaResult)
            raise ApplianceError(f"onnxruntime-genai could not load {self.folder} on {device}: {exc}",
                                 title="GPU unavailable" if device == "cuda" else "Model failed to load",
                                 hint=CUDA_HINT) from exc
        self.context_length = context_length

    def empty_cache(self) -> GenaiCache:  # type: ignore[override]
        return GenaiCache(0)

    def forward(self, ids: list[int], cache: GenaiCache) -> tuple[np.ndarray, GenaiCache]:  # type: ignore[override]
        """Run `ids` after the first `cache.length` positions: the last position's float32 logits
        as a [1, vocab] array, and the longer cache."""
        if not ids:
            raise ValidationError("no token ids to run")
        total = cache.length + len(ids)
        if total > self.context_length:
            raise ValidationError(f"{total} tokens do not fit the context of {self.context_length}",
                                  hint="a shorter conversation, or a larger context_length")
        if self.generator.token_count() != cache.length:
            self.generator.rewind_to(cache.length)
        self.generator.append_tokens(ids)
        logits = np.asarray(self.generator.get_logits(), dtype=np.float32)
        return logits.reshape(-1, logits.shape[-1])[-1:], GenaiCache(total)

    def logits(self, ids: list[int]) -> np.ndarray:
        raise ApplianceError("whole-sequence logits come from OnnxLM on the CPU, not from genai's generator",
                             title="Not supported here")
