"""The artifact's chat template, rendered without transformers, and text streamed out safely.

Why this module exists: the runtime must give a model exactly the token ids it was trained on
(`appliance.chat` renders with transformers' `apply_chat_template`), but a server cannot afford to
import transformers. `ChatTemplate` compiles the template the way transformers does (a sandboxed
Jinja environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML, loop controls and a pass-through `{% generation %}` block) and renders
with the tokenizer's special tokens as variables, so the text, and therefore the ids, are the same;
tests compare both renderings on the real SmolLM2 tokenizer.

`StopText` turns a stream of decoded pieces into the text a user sees: it stops at the first stop
string and holds back any tail that could still become one, so a stop string never leaks out, even
split across tokens. `check_messages` is the one validation of a conversation every engine uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from appliance.errors import ValidationError

ROLES = ("system", "user", "assistant")


class TemplateRenderError(ValidationError):
    title = "Chat template problem"


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
def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; transformers' (and so ours) does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
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
def _compile(source: str) -> Any:
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template and the special-token variables it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None) -> None:
        if not source:
            raise TemplateRenderError("the artifact carries no chat template",
                                      hint="export it again from a model that has one")
        self.source = source
        self.variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        try:
            self._template = _compile(source)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise TemplateRenderError(f"the chat template does not compile: {exc}") from exc

    def render(self, messages: Sequence[dict[str, str]], *, generation_prompt: bool = True) -> str:
        try:
            return str(self._template.render(messages=list(messages), tools=None, documents=None,
                                             add_generation_prompt=generation_prompt,
                                             **self.variables))
        except Exception as exc:  # raise_exception() inside templates, undefined fields, ...
            raise TemplateRenderError(f"the chat template failed to render: {exc}",
                                      hint="check the roles and order of the messages") from exc


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
