"""The artifact's chat template, rendered without transformers, and text streamed out safely.

Why this module exists: the runtime must give a model exactly the token ids it was trained on
(transformers' `apply_chat_template` semantics), but a server cannot afford to import transformers.
`ChatTemplate` compiles the template the way transformers does (a sandboxed
Jinja environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML, loop controls and a pass-through `{% generation %}` block) and renders
with the tokenizer's special tokens as variables, so the text, and therefore the ids, are the same;
tests compare both renderings on the real SmolLM2 tokenizer. It is also the one place a chat template
is rendered (`appliance.chat` renders through it too): every render is bounded in output, memory,
steps and CPU time (`template_limits`), because a template is untrusted input that arrives with a
model.

`check_gguf_templates` checks the chat templates of a GGUF file before llama.cpp compiles them,
reading only the file's metadata (`gguf_metadata`, a header reader that skips arrays and never
parses the tensor infos: gguf's full reader took 2-3 s on the 135M SmolLM2 file, this 25 ms).

`StopText` turns a stream of decoded pieces into the text a user sees: it stops at the first stop
string and holds back any tail that could still become one, so a stop string never leaks out, even
split across tokens. `check_messages` is the one validation of a conversation every engine uses.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from appliance.errors import ValidationError

if TYPE_CHECKING:
    from appliance.runtime.template_limits import RenderLimits

ROLES = ("system", "user", "assistant")


class TemplateRenderError(ValidationError):
    """A template that fails or is refused; `bound` names the render limit that stopped it, if any."""

    title = "Chat template problem"

    def __init__(self, message: str, *, hint: str | None = None, bound: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.bound = bound


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A plain copy of `messages` after checking roles and contents; ValidationError otherwise."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise ValidationError("messages must be a non-empty list of {role, content} objects",
                              hint='e.g. [{"role": "user", "content": "Hello"}]')
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValidationError(f"message {i} is not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ValidationError(f"message {i} has role {role!r}",
                                  hint="roles are " + ", ".join(ROLES))
        if not isinstance(content, str):
            raise ValidationError(f"message {i} ({role}) has content of type {type(content).__name__}",
                                  hint="content must be a string")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates (JSON "\ud800", surrogateescape input)
            raise ValidationError(f"message {i} ({role}) is not valid Unicode text: {exc.reason} at "
                                  f"character {exc.start}", hint="send UTF-8 text") from None
        out.append({"role": role, "content": content})
    return out


# -- the template -------------------------------------------------------------------------------
def _raise_exception(message: Any) -> None:
    import jinja2

    text = message if isinstance(message, str) else f"(raise_exception with a {type(message).__name__})"
    raise jinja2.exceptions.TemplateError(text)


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise ValueError("strftime_now takes a format string of at most 256 characters")
    return datetime.now().strftime(fmt)


def _generation_extension() -> type:
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    return Generation


@lru_cache(maxsize=8)
def _compile(source: str, limits: RenderLimits) -> Any:
    import jinja2.ext

    from appliance.runtime import template_limits as bounds

    env = bounds.BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                    extensions=[_generation_extension(), jinja2.ext.loopcontrols],
                                    trusted=(_raise_exception, _strftime_now))
    env.filters["tojson"] = bounds.bounded_tojson  # json.dumps without Jinja's HTML escaping
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.bound_filters()
    return bounds.compile_template(env, source, limits)


def _short(exc: BaseException, limit: int = 500) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


class ChatTemplate:
    """A compiled chat template and the special-token variables it is rendered with.

    Every render is bounded (`RenderLimits`: output, memory, steps, CPU time); a template that
    goes past a bound fails with a TemplateRenderError naming `origin` and the bound.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None, *,
                 origin: str = "the chat template", limits: RenderLimits | None = None) -> None:
        self.origin = origin
        if not source:
            raise TemplateRenderError("the artifact carries no chat template",
                                      hint="export it again from a model that has one")
        from appliance.runtime.template_limits import DEFAULT_LIMITS, RenderLimitError

        self.source = source
        self.limits = limits or DEFAULT_LIMITS
        self.variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _compile(source, self.limits)
        except RenderLimitError as exc:
            raise TemplateRenderError(f"{origin} is refused: {exc} (limit {exc.bound})",
                                      hint=_LIMIT_HINT, bound=exc.bound) from None
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise TemplateRenderError(f"{origin} does not compile: {_short(exc)}") from exc

    def render(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool = True) -> str:
        from appliance.runtime.template_limits import RenderLimitError, render

        try:
            return render(self._template, self.limits, messages=list(messages), tools=None,
                          documents=None, add_generation_prompt=generation_prompt, **self.variables)
        except RenderLimitError as exc:
            raise TemplateRenderError(f"{self.origin} was stopped while rendering: {exc} "
                                      f"(limit {exc.bound})", hint=_LIMIT_HINT, bound=exc.bound) from None
        except RecursionError:
            raise TemplateRenderError(f"{self.origin} failed to render: it nests or recurses too "
                                      "deeply", hint=_LIMIT_HINT) from None
        except Exception as exc:  # raise_exception() inside templates, undefined fields, ...
            raise TemplateRenderError(f"{self.origin} failed to render: {_short(exc)}",
                                      hint="check the roles and order of the messages") from exc


_LIMIT_HINT = ("a chat template only needs to format the conversation; supply a plain one with "
               "--chat-template FILE (models import)")


def _is_template_key(key: str) -> bool:
    return key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")


def check_gguf_templates(path: Path) -> None:
    """Refuse a GGUF whose chat templates would be unsafe to compile, before llama.cpp loads it.

    llama-cpp-python's `Llama()` compiles every `tokenizer.chat_template*` of the file with plain
    Jinja, whose compiler builds constant expressions with no bound (`{{ 'x' * 10**10 }}`). Each is
    compiled here first in the bounded environment, which refuses such a template by name. Only
    string values count: llama.cpp drops array metadata, and prints a number as digits."""
    from appliance.runtime.template_limits import DEFAULT_LIMITS

    most = 4 * DEFAULT_LIMITS.source_chars  # UTF-8 bytes of the longest template compiled
    for key, source in gguf_metadata(path, _is_template_key, max_string=most).items():
        if isinstance(source, GGUFLongString):
            raise TemplateRenderError(f"{path}: {key} is refused: it is {source.length:,} bytes long "
                                      f"(at most {most:,}) (limit source_chars)", hint=_LIMIT_HINT,
                                      bound="source_chars")
        if isinstance(source, str) and source:
            ChatTemplate(source, origin=f"{path}: {key}")


# -- GGUF metadata ------------------------------------------------------------------------------
# https://github.com/ggml-org/ggml/blob/master/docs/gguf.md: after the magic and version, the
# tensor and key/value counts, then each key/value: key (u64 length + bytes), u32 type, value.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                 11: "<q", 12: "<d"}  # type -> struct format; 8 = string, 9 = array
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)  # what llama.cpp reads
_GGUF_CHUNK = 1 << 20  # bytes read at a time
_MAX_GGUF_KEY = 1 << 16  # keys are short ASCII names
_MIN_GGUF_KV = 8 + 4 + 1  # key length, type, the smallest value
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFLongString:
    """A wanted string value longer than `gguf_metadata`'s max_string: its length, unread."""

    length: int


@dataclass(frozen=True)
class GGUFArray:
    """A wanted array value (the vocabulary): its length, its items unread."""

    count: int


class _BadGGUF(Exception):
    """The header cannot be read; the message says why (the file's path is added)."""


class _GGUFReader:
    """Sequential reads from a GGUF header in chunks; never past the file's end, never more than
    asked for a value it skips. Lengths and counts are checked against what is left of the file
    before anything is read or allocated for them."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size = fh, size
        self.buf = b""
        self.pos = 0  # next byte, in buf
        self.offset = 0  # file offset of buf[0]; the file is positioned at offset + len(buf)

    def tell(self) -> int:
        return self.offset + self.pos

    def left(self) -> int:
        return self.size - self.tell()

    def truncated(self, need: int) -> _BadGGUF:
        return _BadGGUF(f"not a readable GGUF file: it is truncated ({need:,} bytes needed at "
                        f"offset {self.tell():,}, {self.left():,} left)")

    def _fill(self, n: int) -> None:
        have = len(self.buf) - self.pos
        if have >= n:
            return
        if n > self.left():
            raise self.truncated(n)
        chunk = self.fh.read(max(n - have, _GGUF_CHUNK))
        self.buf = self.buf[self.pos:] + chunk
        self.offset += self.pos
        self.pos = 0
        if len(self.buf) < n:
            raise _BadGGUF("not a readable GGUF file: it became shorter while it was read")

    def take(self, n: int) -> bytes:
        self._fill(n)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._fill(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def skip(self, n: int) -> None:
        if n <= len(self.buf) - self.pos:
            self.pos += n
            return
        if n > self.left():
            raise self.truncated(n)
        target = self.tell() + n
        self.fh.seek(target)
        self.buf, self.pos, self.offset = b"", 0, target

    def length(self) -> int:
        """A u64 length of bytes that follow, which must be in the file."""
        n = self.unpack("<Q")
        if n > self.left():
            raise self.truncated(n)
        return n

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings (a vocabulary: tens of thousands), without a call per string."""
        if count > self.left() // 8:
            raise self.truncated(8 * count)
        for _ in range(count):
            if len(self.buf) - self.pos < 8:
                self._fill(8)
            n = _U64.unpack_from(self.buf, self.pos)[0]
            self.pos += 8
            if n <= len(self.buf) - self.pos:
                self.pos += n
            else:
                self.skip(n)


def _read_gguf_metadata(reader: _GGUFReader, want: Callable[[str], bool],
                        max_string: int) -> dict[str, Any]:
    if reader.size < 4 or reader.take(4) != b"GGUF":
        raise _BadGGUF("not a GGUF file (it does not start with GGUF)")
    version = reader.unpack("<I")
    if version not in _GGUF_VERSIONS:
        order = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise _BadGGUF(f"not a readable GGUF file: version {version}{order} is not supported "
                       f"(versions {', '.join(map(str, _GGUF_VERSIONS))} are)")
    reader.unpack("<Q")  # tensor count: the tensor infos follow the metadata and are not read
    count = reader.unpack("<Q")
    if count > reader.left() // _MIN_GGUF_KV:
        raise _BadGGUF(f"not a readable GGUF file: it claims {count:,} metadata keys, more than "
                       f"its {reader.left():,} remaining bytes can hold (truncated or damaged)")
    found: dict[str, Any] = {}
    for _ in range(count):
        size = reader.length()
        if size > _MAX_GGUF_KEY:
            raise _BadGGUF(f"not a readable GGUF file: a metadata key is {size:,} bytes long")
        try:
            key = reader.take(size).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadGGUF("not a readable GGUF file: a metadata key is not UTF-8") from None
        kind = reader.unpack("<I")
        if kind == _GGUF_STRING:
            size = reader.length()
            if not want(key):
                reader.skip(size)
            elif size > max_string:
                reader.skip(size)
                found[key] = GGUFLongString(size)
            else:
                try:
                    found[key] = reader.take(size).decode("utf-8")
                except UnicodeDecodeError:
                    raise _BadGGUF(f"{key} is not UTF-8 text") from None
        elif kind in _GGUF_SCALARS:
            value = reader.unpack(_GGUF_SCALARS[kind])
            if want(key):
                found[key] = value
        elif kind == _GGUF_ARRAY:
            count = _skip_gguf_array(reader, key)
            if want(key):
                found[key] = GGUFArray(count)
        else:
            raise _BadGGUF(f"not a readable GGUF file: {key} has unknown value type {kind}")
    return found


def _skip_gguf_array(reader: _GGUFReader, key: str) -> int:
    """Skip an array value; its length."""
    item, count = reader.unpack("<I"), reader.unpack("<Q")
    if item == _GGUF_STRING:
        reader.skip_strings(count)
    elif item in _GGUF_SCALARS:
        size = struct.calcsize(_GGUF_SCALARS[item])
        if count > reader.left() // size:
            raise reader.truncated(count * size)
        reader.skip(count * size)
    else:  # nested arrays: llama.cpp refuses them too
        raise _BadGGUF(f"not a readable GGUF file: {key} is an array of value type {item}")
    return int(count)


def gguf_metadata(path: Path, want: Callable[[str], bool], *,
                  max_string: int = 1 << 20) -> dict[str, Any]:
    """The string and number values of the GGUF metadata keys that `want` accepts, from the file's
    header alone: arrays (the vocabulary) are skipped (a wanted one comes back as GGUFArray, its
    length), and the tensor infos after the metadata are never read. A wanted string longer than
    `max_string` bytes comes back as GGUFLongString.
    A file that is not a readable GGUF is a ValidationError naming it."""
    try:
        with open(path, "rb") as fh:
            return _read_gguf_metadata(_GGUFReader(fh, os.fstat(fh.fileno()).st_size), want,
                                       max_string)
    except _BadGGUF as exc:
        raise ValidationError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ValidationError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """bos/eos/unk/pad token strings from a tokenizer_config.json (values may be AddedToken dicts)."""
    out: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    extra = config.get("additional_special_tokens")
    if isinstance(extra, list) and extra:
        out["additional_special_tokens"] = [t.get("content") if isinstance(t, Mapping) else t
                                            for t in extra]
    return out


# -- stop strings -------------------------------------------------------------------------------
class StopText:
    """Streamed text up to the first stop string, never showing a stop string or a piece of one.

    `push` returns the text that is safe to show now: everything except a tail that is a prefix of
    some stop string (it may complete into one with the next token). When a stop string appears,
    the text before it is returned and `stopped` turns true; `flush` returns the held-back tail at
    the end of a generation that did not stop on a string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.stopped or not text:
            return ""
        buffer = self.held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return buffer[:cut]
        keep = self._partial_tail(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        for size in range(min(self.longest - 1, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
