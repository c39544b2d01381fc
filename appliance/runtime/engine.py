"""One small chat-engine interface over exported artifacts (GGUF through llama.cpp, ONNX through
onnxruntime), shared by the console chat and the HTTP server.

What every engine promises (`ChatEngine.generate`):
- the conversation is rendered with the artifact's own chat template (the one training used) and
  tokenized exactly as training tokenized it (no special tokens added beyond what the template
  writes), so prompt ids equal `appliance.chat`'s;
- errors come before any output: bad messages or sampling values raise `ValidationError` and a
  prompt that does not fit raises `ContextOverflow` when `generate` is called, not mid-stream;
- output is a stream of `Delta` (one per generated token; its text may be "" while a UTF-8
  character or a possible stop string is incomplete, and a last `Delta` with token_id -1 may carry
  held-back text) ending with exactly one `Done`, whose reason is "stop" (an end-of-generation
  token of the template, or a stop string), "length" (max_tokens reached) or "cancelled";
- stop tokens and stop strings never appear in the text;
- `cancel` is checked at every token (and between prompt chunks); a cancelled generation ends
  with Done("cancelled") and leaves the engine ready for the next one.

Context policy: the engine is strict. When prompt tokens + max_tokens exceed the context (or,
without max_tokens, when the prompt leaves no room for a single token) it raises `ContextOverflow`
naming the three numbers; it never truncates silently. Callers own the policy: the console drops
the oldest turns (keeping the system prompt) and says so; the server returns the error.
`max_tokens=None` means "the rest of the context".

One generation at a time per engine: a second one started while another is streaming raises
`BusyError` (callers serialize, or open one engine per worker).

The runtime is torch- and transformers-free: this module needs only the standard library and the
workspace; the engines import llama_cpp or onnxruntime, numpy, tokenizers and jinja2 when opened.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from appliance.errors import BusyError, ValidationError

if TYPE_CHECKING:
    from appliance.runtime.template import ChatTemplate

MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024  # entries of a logit_bias map
MAX_TOKEN_ID_DIGITS = 10  # a logit_bias key longer than this is no token id (vocabularies have
# < 2**32 entries); checked before int(), which refuses strings over 4,300 digits with ValueError
SEED_MAX = 2**32 - 2  # llama.cpp reads 2**32 - 1 as "pick a random seed"
DEFAULT_MAX_CONTEXT = 8192  # the KV cache is allocated up front: do not take a 128k context unasked
FLAG = "--allow-failed-parity"


# -- the data that crosses the interface ---------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 => greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    repeat_penalty: float = 1.0  # llama.cpp style (CTRL), over the last 64 tokens (prompt+generated)
    max_tokens: int | None = None  # None => the rest of the context
    seed: int | None = None
    stop: tuple[str, ...] = ()  # extra stop strings (text never includes them)
    # (token id, bias) pairs added to the logits before anything else (OpenAI's logit_bias: -100
    # bans a token in practice, +100 makes it the only choice); ids are checked against the
    # engine's vocabulary when generating
    logit_bias: tuple[tuple[int, float], ...] = ()

    def validated(self) -> Sampling:
        """A normalized copy (floats as float, stop as a tuple); ValidationError naming the field
        and its allowed range otherwise."""
        return dataclasses.replace(
            self,
            temperature=_number("temperature", self.temperature, 0.0, 10.0, "0 (greedy) to 10"),
            top_p=_number("top_p", self.top_p, 0.0, 1.0, "greater than 0, at most 1", open_low=True),
            top_k=_integer("top_k", self.top_k, 0, None, "0 (off) or more"),
            repeat_penalty=_number("repeat_penalty", self.repeat_penalty, 0.0, 10.0,
                                   "greater than 0, at most 10 (1 = off)", open_low=True),
            max_tokens=None if self.max_tokens is None else _integer(
                "max_tokens", self.max_tokens, 1, None, "1 or more, or unset for the rest of the context"),
            seed=None if self.seed is None else _integer("seed", self.seed, 0, SEED_MAX, f"0 to {SEED_MAX}"),
            stop=_stops(self.stop), logit_bias=_logit_bias(self.logit_bias))


def _number(name: str, value: Any, low: float, high: float, allowed: str, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValidationError(f"{name} must be a number, not {value!r}", hint=f"{name}: {allowed}")
    if value < low or value > high or (open_low and value == low):
        raise ValidationError(f"{name} is {value}, out of range", hint=f"{name}: {allowed}")
    return float(value)


def _integer(name: str, value: Any, low: int, high: int | None, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer, not {value!r}", hint=f"{name}: {allowed}")
    if value < low or (high is not None and value > high):
        raise ValidationError(f"{name} is {value}, out of range", hint=f"{name}: {allowed}")
    return value


def _stops(value: Any) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else value
    allowed = f"up to {MAX_STOP_STRINGS} non-empty strings"
    if not isinstance(stops, tuple | list) or not all(isinstance(s, str) and s for s in stops):
        raise ValidationError(f"stop must be a list of non-empty strings, not {value!r}",
                              hint=f"stop: {allowed}")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValidationError(f"stop has {len(stops)} strings", hint=f"stop: {allowed}")
    return tuple(stops)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (a JSON object's keys are strings) to a bias from -100 to 100, as
    sorted (id, bias) pairs; ValidationError naming the entry otherwise."""
    allowed = "logit_bias: an object mapping token ids to numbers from -100 to 100"
    if value is None:
        return ()
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, tuple | list) or not all(isinstance(p, tuple | list) and len(p) == 2
                                                       for p in pairs):
        raise ValidationError(f"logit_bias must be an object, not {value!r}"[:200], hint=allowed)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValidationError(f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS}",
                              hint=allowed)
    out: dict[int, float] = {}
    for key, bias in pairs:
        token = key if isinstance(key, int) and not isinstance(key, bool) else \
            int(key) if isinstance(key, str) and key.isascii() and key.isdigit() \
            and len(key) <= MAX_TOKEN_ID_DIGITS else None
        if token is None or not 0 <= token < 10**MAX_TOKEN_ID_DIGITS:
            raise ValidationError(f"logit_bias key {_shown(key)} is not a token id (0 or more, at "
                                  f"most {MAX_TOKEN_ID_DIGITS} digits)", hint=allowed)
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            message = f"logit_bias[{key!r}] is {bias!r}"[:120]
            raise ValidationError(f"{message}; a bias is a number from -100 to 100", hint=allowed)
        if token in out:
            raise ValidationError(f"logit_bias names token {token} twice", hint=allowed)
        out[token] = float(bias)
    return tuple(sorted(out.items()))


def _shown(key: Any) -> str:
    """A short, safe rendering of a client's key (repr of a huge int raises ValueError too)."""
    if isinstance(key, str):
        return repr(key[:40]) + (f"... ({len(key)} characters)" if len(key) > 40 else "")
    if isinstance(key, int) and not isinstance(key, bool) and key.bit_length() > 64:
        return f"(an integer of {key.bit_length()} bits)"
    return repr(key)[:60]


@dataclass(frozen=True)
class Delta:
    text: str  # may be "" while a UTF-8 character (or a possible stop string) is incomplete
    token_id: int  # -1 for the final flush of held-back text


@dataclass(frozen=True)
class Done:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


class ContextOverflow(ValidationError):
    """The prompt plus the requested answer do not fit the context."""

    title = "Context overflow"

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        want = f" + max_tokens {max_tokens}" if max_tokens else ""
        super().__init__(
            f"the prompt is {prompt_tokens} tokens{want}; that does not fit the context of "
            f"{context_length} tokens" + ("" if max_tokens else " (no room left for an answer)"),
            hint="drop earlier turns or shorten the messages, lower max_tokens, or open the model "
                 "with a larger context")
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class ChatEngine(Protocol):
    name: str
    kind: str  # "gguf" | "onnx"
    context_length: int
    vocab_size: int | None

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def generate(self, messages: Sequence[dict[str, str]], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Delta | Done]: ...

    def close(self) -> None: ...


# -- what both engines share ---------------------------------------------------------------------
class EngineBase:
    """The generation loop both engines run; they supply tokenization, the token stream and the
    decoder. Subclasses set name, kind, context_length, template and stop_ids."""

    name: str
    kind: str
    context_length: int
    template: ChatTemplate
    stop_ids: frozenset[int]
    vocab_size: int | None = None  # token ids run 0 to vocab_size - 1 (logit_bias is checked)

    def __init__(self) -> None:
        self._busy = threading.Lock()

    # supplied by the engines
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _tokens(self, ids: list[int], sampling: Sampling,
                cancel: threading.Event | None) -> Generator[int, None, None]:
        """Sampled token ids after the prompt `ids`, one per step, for as long as asked; it ends
        early only when `cancel` is set while the prompt is being read."""
        raise NotImplementedError

    def _decoder(self) -> tuple[Callable[[int], str], Callable[[], str]]:
        """(text of the next token, text still held at the end) for one generation."""
        raise NotImplementedError

    def _is_stop(self, token: int) -> bool:
        return token in self.stop_ids

    def close(self) -> None:
        pass

    # the interface
    def render(self, messages: Sequence[dict[str, str]]) -> str:
        from appliance.runtime.template import check_messages

        return self.template.render(check_messages(messages), generation_prompt=True)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self._encode(self.render(messages))

    def _check_bias(self, sampling: Sampling) -> None:
        if self.vocab_size is None:
            return
        outside = [t for t, _ in sampling.logit_bias if t >= self.vocab_size]
        if outside:
            raise ValidationError(f"logit_bias names token {outside[0]}, outside the vocabulary of "
                                  f"{self.name} (token ids 0 to {self.vocab_size - 1})",
                                  hint="logit_bias: token ids of this model's tokenizer")

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """How many tokens may be generated; ContextOverflow when the request does not fit."""
        room = self.context_length - prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ContextOverflow(prompt_tokens, max_tokens or 0, self.context_length)
        return room if max_tokens is None else max_tokens

    def generate(self, messages: Sequence[dict[str, str]], sampling: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Delta | Done]:
        """Validate now (errors before any output), then stream (see the module docstring)."""
        sampling = sampling.validated()
        self._check_bias(sampling)
        ids = self.prompt_ids(messages)
        if not ids:
            raise ValidationError("the chat template rendered an empty prompt",
                                  hint="send at least one message with content")
        limit = self.budget(len(ids), sampling.max_tokens)
        return self._stream(ids, limit, sampling, cancel)

    def _stream(self, ids: list[int], limit: int, sampling: Sampling,
                cancel: threading.Event | None) -> Iterator[Delta | Done]:
        from appliance.runtime.template import StopText

        if not self._busy.acquire(blocking=False):
            raise BusyError(f"{self.name} is already generating",
                            hint="one generation at a time per engine: wait for it or cancel it")
        try:
            piece, tail = self._decoder()
            stops = StopText(sampling.stop)
            count, reason = 0, "cancelled"  # what an exhausted token stream means: see _tokens
            tokens = self._tokens(ids, sampling, cancel)
            try:
                for token in tokens:
                    if self._is_stop(token):
                        reason = "stop"
                        break
                    count += 1
                    yield Delta(stops.push(piece(token)), token)
                    if stops.stopped:
                        reason = "stop"
                        break
                    if count >= limit:
                        reason = "length"
                        break
                    if cancel is not None and cancel.is_set():
                        break
            finally:
                tokens.close()
            rest = "" if stops.stopped else stops.push(tail()) + stops.flush()
        finally:
            # free before the last items: a consumer that answers on Done (the server) and then
            # gets the next request must find the engine idle, not still held by this generator
            self._busy.release()
        if rest:
            yield Delta(rest, -1)
        yield Done(reason, len(ids), count)


def default_threads() -> int:
    """Half the cores, at most 8: llama.cpp spin-waits, so all cores on a shared box crawl
    (docs/PITFALLS.md); the same default keeps onnxruntime from taking the machine."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def job_threads() -> int:
    """Every core, at most 8: a batch job (an evaluation) has the machine to itself as training
    does; on the 2-core box 2 threads answer and score ~1.4x faster than 1 (issue 17's bench)."""
    return max(1, min(8, os.cpu_count() or 1))


# -- artifacts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # "gguf" | "onnx"
    path: Path  # the .gguf file, or the folder holding model.onnx
    parity: str  # "pass" | "fail" | "unknown"
