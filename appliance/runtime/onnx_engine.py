"""The ONNX chat engine: onnxruntime (CPU, or CUDA with onnxruntime-gpu), its own KV-cache loop.

Why it is built this way:
- The graph is run by `export.onnx.OnnxLM` (onnxruntime + numpy; batch 1, past/present KV
  tensors); this engine adds the chat: the folder's chat template (chat_template.jinja, else
  tokenizer_config.json) rendered by `appliance.runtime.template`, the `tokenizers` library on
  tokenizer.json (no special tokens added, as training tokenized), numpy sampling with llama.cpp's
  parameter meanings (`appliance.runtime.sampling`), and streamed text through the tokenizer's own
  streaming decoder.
- The KV cache is kept after each generation with the ids it holds, so the next turn of a chat
  only runs the new tokens: the past tensors are cut back to the common prefix (a slice).
- Stop ids: generation_config.json's eos_token_id, the template's eos_token, and the
  end-of-text special tokens llama.cpp also treats as end of generation (e.g. `<|endoftext|>`),
  so both engines stop on the same tokens.
- The context limit is config.json's max_position_embeddings (RoPE was trained up to there);
  nothing is allocated up front, so no cap is needed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, ValidationError
from appliance.runtime.engine import DEFAULT_MAX_CONTEXT, Artifact, EngineBase, Sampling, default_threads
from appliance.runtime.template import ChatTemplate, special_tokens_from_config

LOG = logging.getLogger(__name__)

# Special tokens that end a generation whatever the configs say (llama.cpp's EOG list agrees).
END_TOKENS = frozenset({"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
                        "<end_of_turn>", "<|end_of_text|>"})
PREFILL_CHUNK = 512


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def template_source(folder: Path, tokenizer_config: dict[str, Any]) -> str:
    """The chat template of an exported folder: chat_template.jinja, else tokenizer_config.json's
    (a string, or a list of named templates of which "default" is the one)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                     None)
    return value if isinstance(value, str) else ""


def _providers(gpu: bool | None) -> list[str]:
    import onnxruntime as ort

    from export.onnx import CUDA_HINT

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if gpu and not has_cuda:
        raise ApplianceError("onnxruntime has no CUDA execution provider here", title="No GPU",
                             hint=CUDA_HINT)
    return ["CUDAExecutionProvider"] if has_cuda and gpu is not False else ["CPUExecutionProvider"]


def default_context(folder: Path, trained: int | None) -> int:
    """The context when none is asked: the trained one; for a genai-built folder (the fp16 export)
    capped at DEFAULT_MAX_CONTEXT as for GGUF, because on CUDA genai allocates its KV buffer for the
    whole context up front (a 128k-token model would take its cache for 128k tokens unasked)."""
    if (folder / "genai_config.json").is_file():
        return min(int(trained or DEFAULT_MAX_CONTEXT), DEFAULT_MAX_CONTEXT)
    return int(trained or 2048)


class OnnxEngine(EngineBase):
    """An ONNX export (folder with model.onnx) behind the `ChatEngine` interface."""

    kind = "onnx"

    def __init__(self, artifact: Artifact, *, threads: int | None = None,
                 context_length: int | None = None, gpu: bool | None = None) -> None:
        from export.onnx import OnnxLM

        super().__init__()
        self.name, self.folder = artifact.name, Path(artifact.path)
        if not (self.folder / "tokenizer.json").is_file():
            raise ValidationError(f"{self.folder} has no tokenizer.json",
                                  hint="the ONNX folder must be self-contained; export it again")
        providers = _providers(gpu)
        self.threads = threads or default_threads()
        self.context_length = self._context(context_length)
        try:
            self.lm = self._open(providers)
        except ApplianceError as exc:
            if gpu is not None or providers[0] == "CPUExecutionProvider":
                raise  # --gpu asked for it (or the CPU failed): say so, never serve elsewhere
            LOG.warning("%s; running %s on the CPU (%s)", exc.message, self.name, exc.hint)
            self.lm = OnnxLM(self.folder, threads=self.threads, providers=["CPUExecutionProvider"])
        self.gpu = self.lm.device == "cuda"
        config = _read_json(self.folder / "tokenizer_config.json")
        self.template = ChatTemplate(template_source(self.folder, config), special_tokens_from_config(config),
                                     origin=f"{self.folder}: chat template")
        self.vocab_size = int(self.lm.config.get("vocab_size") or self.lm.tokenizer.get_vocab_size())
        self.stop_ids = frozenset(self._stop_ids())
        self._cached: list[int] = []  # the ids whose keys/values self._cache holds
        self._cache = self.lm.empty_cache()

    def _open(self, providers: list[str]) -> Any:
        """On CUDA a genai-built folder runs through onnxruntime-genai (genai_lm says why); the
        rest, and everything on the CPU, through onnxruntime as the export stage checked it."""
        from appliance.runtime import genai_lm
        from export.onnx import OnnxLM

        if providers[0] == "CUDAExecutionProvider" and genai_lm.usable(self.folder):
            return genai_lm.GenaiLM(self.folder, self.context_length)
        return OnnxLM(self.folder, threads=self.threads, providers=providers)

    def _context(self, asked: int | None) -> int:
        trained = _read_json(self.folder / "config.json").get("max_position_embeddings")
        if asked is None:
            return default_context(self.folder, trained)
        if trained and asked > trained:
            raise ValidationError(f"context_length {asked} is more than the model was trained on ({trained})",
                                  hint=f"context_length: at most {trained}")
        return asked

    def _stop_ids(self) -> set[int]:
        tokenizer = self.lm.tokenizer
        special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        stops = set(self.lm.stop_ids) | {special[t] for t in END_TOKENS if t in special}
        eos = self.template.variables.get("eos_token")
        if eos and tokenizer.token_to_id(eos) is not None:
            stops.add(int(tokenizer.token_to_id(eos)))
        return stops

    def _encode(self, text: str) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=False).ids)

    # -- generation ----------------------------------------------------------------------------
    def _resume(self, ids: list[int]) -> Any:
        """The cache cut back to the longest prefix of `ids` it holds (leaving at least one id to run)."""

        n = min(len(self._cached), self._cache.length, len(ids) - 1)
        keep = next((i for i in range(n) if self._cached[i] != ids[i]), max(n, 0))
        if keep == self._cache.length:
            return self._cache
        if keep == 0:
            return self.lm.empty_cache()
        return self._cache.cut(keep)

    def _tokens(self, ids: list[int], sampling: Sampling,
                cancel: threading.Event | None) -> Generator[int, None, None]:
        import numpy as np

        from appliance.runtime.sampling import Sampler

        # seeded: the whole prompt again, so the seed reproduces whatever the cache held (see
        # llama_engine: cached and fresh evaluations differ in the last bits)
        cache = self.lm.empty_cache() if sampling.seed is not None else self._resume(ids)
        self._cached, self._cache = ids[:cache.length], cache
        sampler = Sampler(sampling, ids)
        logits: Any = None
        for start in range(cache.length, len(ids), PREFILL_CHUNK):
            if cancel is not None and cancel.is_set():
                return
            chunk = ids[start:start + PREFILL_CHUNK]
            logits, cache = self.lm.forward(chunk, cache)
            self._cached, self._cache = self._cached + chunk, cache
        row = logits[-1]
        while True:
            token = sampler(np.asarray(row, dtype=np.float32))
            yield token
            row, cache = self.lm.decode(token, cache)
            self._cached.append(token)
            self._cache = cache

    def _decoder(self) -> tuple[Callable[[int], str], Callable[[], str]]:
        return stream_decoder(self.lm.tokenizer)

    def close(self) -> None:
        self._cache = self.lm.empty_cache()
        self._cached = []



def stream_decoder(tokenizer: Any) -> tuple[Callable[[int], str], Callable[[], str]]:
    """(text of the next token, text still held at the end) through the tokenizer's streaming
    decoder, which holds a character split over tokens until it is whole. What it still holds when
    the answer ends (cut by max_tokens mid-character) comes out as U+FFFD, as llama.cpp's engine
    does, instead of vanishing."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=True)
    held: list[int] = []

    def piece(token: int) -> str:
        text = stream.step(tokenizer, token) or ""
        held[:] = [] if text else [*held, token]
        return text

    def tail() -> str:
        return tokenizer.decode(held, skip_special_tokens=True) if held else ""

    return piece, tail
