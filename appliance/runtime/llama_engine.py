"""The GGUF chat engine: llama-cpp-python, CPU or GPU offload, llama.cpp's own sampler chain.

Why it is built this way:
- Sampling is llama.cpp's sampler chain (C API: logit bias -> penalties -> top-k -> top-p ->
  temperature -> dist, or logit bias -> penalties -> greedy), built per generation from
  `Sampling`, so the knobs mean what they mean in llama.cpp and `appliance.runtime.sampling`
  mirrors them for ONNX. The penalty
  window is fed the prompt's last 64 tokens first (llama-cpp-python's `generate` would only see
  generated ones), and the dist sampler takes the seed, so a seed reproduces a generation.
- The KV cache is reused across turns: a new prompt that starts with what the context already
  holds (the previous turn's prompt and answer) only evaluates the rest. `Llama.eval` drops the
  cache beyond `n_tokens`, so reusing a prefix is setting `n_tokens` to its length. Not for a seeded
  generation: it evaluates its prompt from scratch so the seed reproduces it whatever came before.
- The prompt is the artifact's own template (GGUF metadata `tokenizer.chat_template`) rendered
  by `appliance.runtime.template`, tokenized by llama.cpp with special tokens parsed and no BOS
  added (templates write their own, and training tokenized that way). Generation stops on every
  end-of-generation token llama.cpp knows for the vocabulary, plus the export's recorded stop ids.
- The context is allocated up front, so it defaults to the trained context capped at
  `DEFAULT_MAX_CONTEXT`; the trained context is read from the GGUF header without parsing the
  vocabulary (gguf-py's reader takes seconds on it).
- Threads default to half the cores (llama.cpp spin-waits; docs/PITFALLS.md), for prompt
  batches too (llama-cpp-python would take every core there).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, IntegrityError, ValidationError
from appliance.runtime.engine import DEFAULT_MAX_CONTEXT, Artifact, EngineBase, Sampling, default_threads
from appliance.runtime.sampling import PENALTY_WINDOW
from appliance.runtime.template import ChatTemplate, TemplateRenderError, check_gguf_templates, gguf_metadata

_REEXPORT = "the file is truncated or not a model llama.cpp supports; export it again"
# GGUF value types -> byte sizes of the fixed-size ones (8 = string, 9 = array)
def gguf_context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF header (None if the file does not say, or is not a
    readable GGUF: llama.cpp's own load then says why)."""
    try:
        meta = gguf_metadata(path, lambda k: k == "general.architecture" or k.endswith(".context_length"))
    except ValidationError:
        return None
    value = meta.get(f"{meta.get('general.architecture')}.context_length")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def pick_context(asked: int | None, trained: int | None) -> int:
    """The context to allocate: what was asked (not beyond training), else trained capped."""
    if asked is None:
        return min(trained or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
    if trained and asked > trained:
        raise ValidationError(f"context_length {asked} is more than the model was trained on ({trained})",
                              hint=f"context_length: at most {trained}")
    return asked


def _gpu_layers(gpu: bool | None) -> int:
    import llama_cpp

    available = bool(llama_cpp.llama_supports_gpu_offload())
    if gpu and not available:
        raise ApplianceError("this llama-cpp-python build cannot offload to a GPU",
                             title="No GPU offload",
                             hint="rebuild llama-cpp-python with CUDA (CMAKE_ARGS=-DGGML_CUDA=on), "
                                  "or run on the CPU")
    return -1 if available and gpu is not False else 0


def _accept_history(chain: Any, history: list[int]) -> None:
    """The penalty window's tokens (prompt and generated so far) as already seen by `chain`."""
    import llama_cpp

    for token in history[-PENALTY_WINDOW:]:
        llama_cpp.llama_sampler_accept(chain, token)


class LlamaEngine(EngineBase):
    """A GGUF artifact in llama.cpp behind the `ChatEngine` interface."""

    kind = "gguf"

    def __init__(self, artifact: Artifact, *, threads: int | None = None,
                 context_length: int | None = None, gpu: bool | None = None) -> None:
        import llama_cpp

        super().__init__()
        self.name, self.path = artifact.name, Path(artifact.path)
        self.context_length = pick_context(context_length, gguf_context_length(self.path))
        layers = _gpu_layers(gpu)
        self.gpu = layers != 0
        self.backend_sampling = self.gpu  # see `_tokens`
        self._attached: tuple[tuple[Any, ...], Any] | None = None  # (settings, chain) in the graph
        self.threads = threads or default_threads()
        self._llm: Any = None
        try:
            check_gguf_templates(self.path)  # Llama() compiles them with unbounded Jinja
        except TemplateRenderError:
            raise
        except ValidationError as exc:  # not a readable GGUF header
            raise IntegrityError(f"llama.cpp cannot load it: {exc.message}", hint=_REEXPORT) from None
        try:
            self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.context_length,
                                        n_threads=self.threads, n_threads_batch=self.threads,
                                        n_gpu_layers=layers, logits_all=False, verbose=False,
                                        flash_attn=self.gpu)  # as llama-bench's "auto" does on CUDA
        except ValueError as exc:
            raise IntegrityError(f"{self.path}: llama.cpp cannot load it: {exc}",
                                 hint=_REEXPORT) from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.vocab_size = int(self._llm.n_vocab())
        self._reuse = not llama_cpp.llama_model_is_recurrent(self._llm.model)
        self.template = ChatTemplate(self._chat_template(), self._special_tokens(),
                                     origin=f"{self.path}: tokenizer.chat_template")
        self.stop_ids = frozenset(self._recorded_stop_ids())

    def _chat_template(self) -> str:
        """tokenizer.chat_template, read whole from llama.cpp (llama-cpp-python's `metadata` dict cuts
        a value of exactly 1024 bytes short by one)."""
        import llama_cpp

        raw = llama_cpp.llama_model_chat_template(self._llm.model, None)
        return raw.decode("utf-8") if raw else ""

    def _token_text(self, token: int) -> str | None:
        import llama_cpp

        if token < 0 or token >= self._llm.n_vocab():
            return None
        return bytes(llama_cpp.llama_vocab_get_text(self._vocab, token)).decode("utf-8", "replace")

    def _special_tokens(self) -> dict[str, Any]:
        meta = self._llm.metadata
        out = {}
        for name in ("bos", "eos", "unknown", "padding"):
            value = meta.get(f"tokenizer.ggml.{name}_token_id")
            text = self._token_text(int(value)) if value is not None else None
            if text is not None:
                out[{"unknown": "unk_token", "padding": "pad_token"}.get(name, f"{name}_token")] = text
        return out

    def _recorded_stop_ids(self) -> set[int]:
        """EOS and EOT of the vocabulary and the export's recorded stop ids (gguf_check.json); every
        other end-of-generation token llama.cpp knows is caught by `_is_stop` too."""
        import llama_cpp

        ids = {int(llama_cpp.llama_vocab_eos(self._vocab)), int(llama_cpp.llama_vocab_eot(self._vocab))}
        check = self.path.parent / "gguf_check.json"
        if check.is_file():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                recorded = json.loads(check.read_text(encoding="utf-8")).get("stop_token_ids", [])
                ids |= {int(i) for i in recorded}
        return {i for i in ids if i >= 0}

    def _is_stop(self, token: int) -> bool:
        import llama_cpp

        return token in self.stop_ids or bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _encode(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    # -- generation ----------------------------------------------------------------------------
    def _reusable_prefix(self, ids: list[int]) -> int:
        """How many leading prompt tokens the context already holds (one short of the whole prompt:
        the last one is evaluated again for its logits)."""
        llm = self._llm
        if not self._reuse:
            return 0
        n = min(llm.n_tokens, len(ids) - 1)
        cached = llm.input_ids[:n].tolist()
        for i in range(n):
            if cached[i] != ids[i]:
                return i
        return max(n, 0)

    def _sampler(self, sampling: Sampling, history: list[int]) -> Any:
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        steps = []
        if sampling.logit_bias:  # first, as llama.cpp's own sampler chain puts it (it copies the array)
            biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))(
                *(llama_cpp.llama_logit_bias(token=t, bias=b) for t, b in sampling.logit_bias))
            steps.append(llama_cpp.llama_sampler_init_logit_bias(
                self.vocab_size, len(sampling.logit_bias), biases))
        steps.append(llama_cpp.llama_sampler_init_penalties(self.vocab_size, PENALTY_WINDOW,
                                                            sampling.repeat_penalty, 0.0, 0.0))
        if sampling.temperature == 0.0:
            steps.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.top_k > 0:
                steps.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            if sampling.top_p < 1.0:
                steps.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed
            steps += [llama_cpp.llama_sampler_init_temp(sampling.temperature),
                      llama_cpp.llama_sampler_init_dist(seed)]
        for step in steps:
            llama_cpp.llama_sampler_chain_add(chain, step)
        _accept_history(chain, history)
        return chain

    def _backend_chain(self, sampling: Sampling, history: list[int]) -> tuple[Any, bool]:
        """(the chain, whether it runs in llama.cpp's graph). Attaching one makes llama.cpp
        reserve its graph again (~7-12 ms of time to first token on an H100), so the attached chain
        stays for the next request with the same settings, reset; other settings replace it."""
        import llama_cpp

        key = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
               tuple(sorted(dict(sampling.logit_bias or ()).items())), sampling.repeat_penalty)
        if self._attached is not None and self._attached[0] == key:
            chain = self._attached[1]
            llama_cpp.llama_sampler_reset(chain)
            _accept_history(chain, history)
            return chain, True
        self._detach()
        chain = self._sampler(sampling, history)
        if not llama_cpp.llama_set_sampler(self._llm.ctx, 0, chain):
            return chain, False
        self._attached = (key, chain)
        return chain, True

    def _detach(self) -> None:
        """Take the attached backend chain off the context and free it (before scoring, which
        needs the logits, and before closing)."""
        import llama_cpp

        if self._attached is not None:
            llama_cpp.llama_set_sampler(self._llm.ctx, 0, None)
            llama_cpp.llama_sampler_free(self._attached[1])
            self._attached = None

    def _tokens(self, ids: list[int], sampling: Sampling,
                cancel: threading.Event | None) -> Generator[int, None, None]:
        import llama_cpp

        llm = self._llm
        # eval() drops the cache beyond n_tokens. A seeded generation evaluates its whole prompt:
        # a prompt evaluated in one batch and one partly from the cache differ in the last bits of
        # the logits, which a sampled draw can turn into another token; a seed must reproduce.
        llm.n_tokens = 0 if sampling.seed is not None else self._reusable_prefix(ids)
        # On the GPU the chain runs inside llama.cpp's graph (backend sampling): only the token
        # comes back, not the logits to sample on the host (~0.6 ms a token for 8B on an H100;
        # bench/results/gguf-gpu-h100.md). Same tokens as the host chain (tested on the CPU).
        chain, on_backend = (self._backend_chain(sampling, ids) if self.backend_sampling
                             else (self._sampler(sampling, ids), False))
        try:
            rest = ids[llm.n_tokens:]
            for start in range(0, len(rest), llm.n_batch):
                if cancel is not None and cancel.is_set():
                    return
                llm.eval(rest[start:start + llm.n_batch])
            while True:
                token = int(llama_cpp.llama_sampler_sample(chain, llm.ctx, -1))  # also accepts it
                yield token
                llm.eval([token])
        finally:
            if not on_backend:  # an attached chain stays for the next request (`_backend_chain`)
                llama_cpp.llama_sampler_free(chain)

    def logits_at(self, ids: list[int], positions: list[int]) -> Any:
        """Teacher-forced logits after each of `positions` (ascending) of `ids`, in this engine's
        own context: the prefix it already holds (the prompt it just answered) is not evaluated
        again. For scoring a reference answer (appliance eval); not thread-safe with `generate`."""
        from appliance.runtime.llama_batch import decode_at

        self._detach()
        keep = min(self._reusable_prefix(ids), positions[0]) if positions else 0
        return decode_at(self._llm, ids[keep:], keep, positions)

    def _decoder(self) -> tuple[Callable[[int], str], Callable[[], str]]:
        """Token bytes from llama.cpp through an incremental UTF-8 decoder (a character split over
        tokens comes out whole with the token that completes it)."""
        import llama_cpp

        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        buf = ctypes.create_string_buffer(256)

        def piece(token: int) -> str:
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # a longer piece than the buffer: once, rarely
                big = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, big, len(big), 0, False)
                return utf8.decode(big.raw[:n])
            return utf8.decode(buf.raw[:n])

        return piece, lambda: utf8.decode(b"", final=True)

    def close(self) -> None:
        if getattr(self, "_llm", None) is not None:
            self._detach()
            self._llm.close()
            self._llm = None
