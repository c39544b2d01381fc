"""Ollama support for a GGUF export: a Modelfile that works with `ollama create` without edits.

Why it exists: a GGUF carries the model's Jinja chat template, but Ollama prompts with a Go
text/template given in the Modelfile's TEMPLATE (falling back to its own reading of the GGUF's
template otherwise). A TEMPLATE that renders a prompt even slightly different from the one the model
was trained on degrades it silently, so the TEMPLATE is not guessed from the Jinja source:
- A family's Go template (chatml, llama3, mistral) is emitted only if it renders exactly what the
  model's Jinja template renders on probe conversations: with and without a system prompt, over
  several turns, and with the edges where templates differ (leading and trailing spaces and
  newlines, an empty system prompt, non-ASCII text). A small interpreter here executes the subset
  of Go's text/template those templates use, and `render_ollama` feeds it what Ollama's chat
  endpoint would (consecutive messages of one role merged, system text in .System).
- Ollama's templates cannot trim text: Go's text/template has no trim function and Ollama adds only
  json, currentDate, yesterdayDate and toTypeScriptType (template/template.go). A Jinja template
  that trims messages (Llama 3: `message['content'] | trim`) can therefore only be matched for
  messages that arrive trimmed. Such a match is kept, because without a TEMPLATE Ollama picks a
  built-in template of its own, which does not trim either, but the Modelfile says exactly which
  roles the model's template trims and that the prompts are the same only for text without
  leading or trailing whitespace (`OllamaTemplate.trimmed_roles`).
- A default system prompt the Jinja template inserts when none is given becomes the SYSTEM line.
- Otherwise the Modelfile leaves TEMPLATE out and says so, and Ollama falls back to the template
  inside the GGUF.
- Stop tokens and sampling defaults (generation_config.json) become PARAMETER lines; values that
  Ollama's Modelfile syntax cannot quote are refused rather than written broken.

Headless and light: imports only the standard library and appliance helpers at module level;
`export.gguf` and transformers are imported inside functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import hfmodel
from appliance.errors import ValidationError
from appliance.fsutil import atomic_write_text

if TYPE_CHECKING:
    from export.gguf import ChatSpec

Render = Callable[[list[dict[str, str]]], str]

PROBE_SYSTEM = "You answer briefly."


# -- Go templates (the subset Ollama templates use) -----------------------------------------------
class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:\\.|[^"\\])*"|-?\d+|\$\w*(?:\.\w+)*|(?:\.\w+)+|\.|\w+)')
_WS = " \t\r\n"


@dataclass
class _If:
    branches: list[tuple[Any, list[Any]]]
    orelse: list[Any] | None = None


@dataclass
class _Range:
    names: list[str]
    expr: Any
    body: list[Any] = field(default_factory=list)
    orelse: list[Any] | None = None


def _lex(src: str) -> Iterator[tuple[str, str]]:
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        text = text.lstrip(_WS) if trim_next else text
        yield "text", text.rstrip(_WS) if m.group(1) else text
        yield "action", m.group(2).strip()
        pos, trim_next = m.end(), bool(m.group(3))
    yield "text", src[pos:].lstrip(_WS) if trim_next else src[pos:]


def _operand(tok: str) -> tuple[Any, ...]:
    if tok.startswith('"'):
        return ("lit", json.loads(tok))
    if re.fullmatch(r"-?\d+", tok):
        return ("lit", int(tok))
    if tok in ("true", "false", "nil"):
        return ("lit", {"true": True, "false": False, "nil": None}[tok])
    if tok.startswith("$"):
        name, *fields = tok.split(".")
        return ("var", name, fields)
    if tok.startswith("."):
        return ("field", [f for f in tok.split(".") if f])
    return ("call", tok, [])


def _pipeline(tokens: list[str], pos: int) -> tuple[tuple[Any, ...], int]:
    items: list[tuple[Any, ...]] = []
    while pos < len(tokens) and tokens[pos] != ")":
        if tokens[pos] == "(":
            sub, pos = _pipeline(tokens, pos + 1)
            if pos >= len(tokens):
                raise GoTemplateError("unclosed parenthesis")
            items.append(sub)
        else:
            items.append(_operand(tokens[pos]))
        pos += 1
    if not items:
        raise GoTemplateError("empty command")
    head = items[0]
    if head[0] == "call" and not head[2]:
        return ("call", head[1], items[1:]), pos
    if len(items) > 1:
        raise GoTemplateError(f"can't give arguments to a non-function: {tokens}")
    return head, pos


def _expr(src: str) -> tuple[Any, ...]:
    if "|" in src:
        raise GoTemplateError("pipes are not supported")
    tokens, pos = [], 0
    while src[pos:].strip():
        m = _TOKEN.match(src, pos)
        if m is None:
            raise GoTemplateError(f"cannot parse {src[pos:]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    expr, pos = _pipeline(tokens, 0)
    if pos != len(tokens):
        raise GoTemplateError(f"unexpected ')' in {src!r}")
    return expr


def parse_go_template(src: str) -> list[Any]:
    """Parse the Go text/template subset: text, trim markers, if/else if/else, range (with
    `$i, $x :=`), `$var :=`, fields, string/int literals, and eq ne and or not len slice."""
    root: list[Any] = []
    body = root
    stack: list[tuple[_If | _Range, list[Any]]] = []  # open blocks, each with its parent's body
    for kind, value in _lex(src):
        if kind == "text":
            if value:
                body.append(value)
            continue
        if value.startswith("/*"):
            continue
        word = value.split(None, 1)[0] if value else ""
        if word == "if":
            if_node = _If([(_expr(value[2:]), [])])
            body.append(if_node)
            stack.append((if_node, body))
            body = if_node.branches[0][1]
        elif value.startswith("else if "):
            open_node = stack[-1][0] if stack else None
            if not isinstance(open_node, _If):
                raise GoTemplateError("else if outside if")
            open_node.branches.append((_expr(value[len("else if "):]), []))
            body = open_node.branches[-1][1]
        elif value == "else":
            if not stack:
                raise GoTemplateError("else outside if/range")
            orelse: list[Any] = []
            stack[-1][0].orelse = orelse
            body = orelse
        elif value == "end":
            if not stack:
                raise GoTemplateError("unexpected end")
            body = stack.pop()[1]
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*(?:,\s*(\$\w*))?\s*:=\s*)?(.+)", value, re.S)
            if not m:
                raise GoTemplateError(f"cannot parse {value!r}")
            range_node = _Range([n for n in m.groups()[:2] if n], _expr(m.group(3)))
            body.append(range_node)
            stack.append((range_node, body))
            body = range_node.body
        elif m := re.fullmatch(r"(\$\w+)\s*:=\s*(.+)", value, re.S):
            body.append(("assign", m.group(1), _expr(m.group(2))))
        else:
            body.append(("print", _expr(value)))
    if stack:
        raise GoTemplateError("missing end")
    return root


def _truth(value: Any) -> bool:
    return bool(value) if value is not None else False


def _get(value: Any, names: Iterable[str]) -> Any:
    for name in names:
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


def _go_slice(value: Any, *idx: int) -> Any:
    return value[idx[0]:idx[1]] if len(idx) == 2 else value[idx[0]:] if idx else value


_FUNCS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a), "len": len, "slice": _go_slice, "json": json.dumps,
}


def _eval(expr: tuple[Any, ...], dot: Any, scopes: list[dict[str, Any]]) -> Any:
    kind = expr[0]
    if kind == "lit":
        return expr[1]
    if kind == "field":
        return _get(dot, expr[1])
    if kind == "var":
        scope = next((s for s in reversed(scopes) if expr[1] in s), None)
        if scope is None:
            raise GoTemplateError(f"undefined variable {expr[1]}")
        return _get(scope[expr[1]], expr[2])
    name, args = expr[1], expr[2]
    if name in ("and", "or"):  # short-circuit, returning the deciding operand like Go
        value = None
        for arg in args:
            value = _eval(arg, dot, scopes)
            if _truth(value) != (name == "and"):
                return value
        return value
    if name not in _FUNCS:
        raise GoTemplateError(f"function {name!r} is not supported")
    return _FUNCS[name](*(_eval(a, dot, scopes) for a in args))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "<no value>" if value is None else str(value)


def _execute(nodes: list[Any], dot: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _If):
            chosen = next((b for c, b in node.branches if _truth(_eval(c, dot, scopes))), node.orelse)
            if chosen is not None:
                _execute(chosen, dot, [*scopes, {}], out)
        elif isinstance(node, _Range):
            items = _eval(node.expr, dot, scopes) or []
            for i, item in enumerate(items):
                frame = dict(zip(node.names, (i, item))) if len(node.names) == 2 else \
                    dict.fromkeys(node.names, item)
                _execute(node.body, item, [*scopes, frame], out)
            if not items and node.orelse is not None:
                _execute(node.orelse, dot, [*scopes, {}], out)
        elif node[0] == "assign":
            scopes[-1][node[1]] = _eval(node[2], dot, scopes)
        else:
            out.append(_show(_eval(node[1], dot, scopes)))


def render_go_template(template: str, data: dict[str, Any]) -> str:
    """Render a Go text/template (the subset `parse_go_template` reads) against `data`."""
    out: list[str] = []
    _execute(parse_go_template(template), data, [{"$": data}], out)
    return "".join(out)


def render_ollama(template: str, messages: Sequence[dict[str, str]]) -> str:
    """What Ollama's chat endpoint renders: consecutive messages of one role merged, every system
    message's text also in .System (Ollama's template.collate), .Messages with .Role/.Content."""
    merged: list[dict[str, str]] = []
    for m in messages:
        if merged and merged[-1]["Role"] == m["role"]:
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render_go_template(template, {"System": system, "Messages": merged, "Tools": None,
                                         "Response": ""})


# -- Ollama ---------------------------------------------------------------------------------------
OLLAMA_TEMPLATES = {  # every message in place (an empty system prompt too), a trailing assistant open
    "chatml": """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}""",
    "llama3": """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|eot_id|>
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}""",
    "mistral": """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}[INST] {{ if $last }}{{ range $j, $m := slice $.Messages 0 1 }}
{{- if eq $m.Role "system" }}{{ $m.Content }}

{{ end }}{{ end }}{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}
{{- if not $last }}</s>
{{- end }}
{{- end }}
{{- end }}""",
}
_SENTINEL = "\x00SYSTEM\x00"
_PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Hello."}],
    [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": "Hello."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?\nJust one word."}],
    [{"role": "system", "content": PROBE_SYSTEM}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
    # the edges: padded text (spaces, tabs, newlines), an empty system prompt, non-ASCII text
    [{"role": "user", "content": "  Hello. \n"}],
    [{"role": "system", "content": "\n You answer briefly.\t"}, {"role": "user", "content": "\tHi\n\n"}],
    [{"role": "user", "content": " Name a colour."}, {"role": "assistant", "content": "\nBlue. "},
     {"role": "user", "content": "Another one? \n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Hello."}],
    [{"role": "user", "content": "Ça va ? 😀 東京 مرحبا e\u0301"}, {"role": "assistant", "content": "Oui ✓"},
     {"role": "user", "content": "\u00a0Et\u200b toi ?\u00a0"}],
)
_ROLE_SETS: tuple[tuple[str, ...], ...] = (  # which roles the Jinja template may trim, fewest first
    (), ("assistant",), ("user",), ("system",), ("user", "assistant"), ("system", "assistant"),
    ("system", "user"), ("system", "user", "assistant"))


@dataclass(frozen=True)
class OllamaTemplate:
    family: str
    template: str
    system: str | None  # the system prompt the Jinja template inserts when none is given
    # roles whose text the Jinja template trims: the prompts match only if clients send them trimmed
    trimmed_roles: tuple[str, ...] = ()


def _jinja(render: Render, messages: list[dict[str, str]], strip: str | None) -> str | None:
    try:
        text = render(messages)
    except Exception:  # the template rejects this conversation: not a family we can mirror
        return None
    return text[len(strip):] if strip and text.startswith(strip) else text


def _default_system(template: str, render: Render, strip: str | None) -> tuple[bool, str | None]:
    """(matches so far, default system prompt) from a user-only conversation."""
    user_only = _PROBES[0]
    jinja = _jinja(render, user_only, strip)
    if jinja is None:
        return False, None
    if jinja == render_ollama(template, user_only):
        return True, None
    head, _, tail = render_ollama(template, [{"role": "system", "content": _SENTINEL},
                                            *user_only]).partition(_SENTINEL)
    if jinja.startswith(head) and jinja.endswith(tail) and len(jinja) > len(head) + len(tail):
        return True, jinja[len(head):len(jinja) - len(tail)]
    return False, None


def _trimmed(messages: list[dict[str, str]], roles: tuple[str, ...]) -> list[dict[str, str]]:
    """What a client sends when it trims the text of `roles` (Jinja's trim is Python's str.strip)."""
    return [{**m, "content": m["content"].strip()} if m["role"] in roles else m for m in messages]


def _matches(template: str, render: Render, strip: str | None,
             roles: tuple[str, ...]) -> tuple[bool, str | None]:
    ok, system = _default_system(template, render, strip)
    if not ok:
        return False, None
    for probe in _PROBES:
        has_system = any(m["role"] == "system" for m in probe)
        sent = _trimmed(probe, roles)
        sent = sent if has_system or system is None else [{"role": "system", "content": system}, *sent]
        if _jinja(render, probe, strip) != render_ollama(template, sent):
            return False, None
    return True, system


def ollama_template(render: Render, *, strip_prefix: str | None = None) -> OllamaTemplate | None:
    """The Ollama template family that renders exactly what `render` (the model's Jinja template
    with add_generation_prompt) renders on the probe conversations, or None. `strip_prefix` is a
    BOS text the Jinja template writes but the runtime adds as a token instead. When the Jinja
    template trims some roles' text, the match holds for that text sent trimmed, and
    `trimmed_roles` says which roles."""
    for roles in _ROLE_SETS:  # an exact match first; then the fewest roles trimmed
        for family, template in OLLAMA_TEMPLATES.items():
            ok, system = _matches(template, render, strip_prefix, roles)
            if ok:
                return OllamaTemplate(family, template, system, roles)
    return None


def _quoted(value: str, what: str) -> str:
    if any(c in value for c in '"\n\\'):
        raise ValidationError(f"{what} {value!r} cannot be written in a Modelfile (quote, backslash "
                              "or newline)")
    return f'"{value}"'


def _triple(value: str, what: str) -> str:
    if '"""' in value:
        raise ValidationError(f"the {what} contains \"\"\" and cannot be written in a Modelfile")
    return f'"""{value}"""'


def _number(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"{float(value):g}"


def _claim(template: OllamaTemplate) -> str:
    """What the TEMPLATE line may claim, as Modelfile comment text."""
    if not template.trimmed_roles:
        return (f"renders the same prompts as the model's Jinja template (checked on {len(_PROBES)} "
                "conversations,\n#   including messages with leading and trailing whitespace, an empty "
                "system prompt and non-ASCII text).")
    roles = ", ".join(template.trimmed_roles)
    return ("renders the same prompts as the model's Jinja template only for messages without leading "
            f"or trailing whitespace:\n#   the Jinja template trims {roles} messages (| trim) and "
            "Ollama's Go templates have no trim function,\n#   so send that text trimmed (as Python's "
            "str.strip() does) to get the prompts the model was trained on.")


def generation_parameters(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json, as Ollama parameters (only when it samples)."""
    path = Path(model_dir) / "generation_config.json"
    gen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not gen.get("do_sample"):
        return {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "repeat_penalty"}
    return {ollama: gen[hf] for hf, ollama in names.items() if gen.get(hf) is not None}


def modelfile_text(gguf_name: str, *, template: OllamaTemplate | None, stop_tokens: Sequence[str],
                   parameters: dict[str, Any] | None = None, source: str = "",
                   licences: Sequence[str] = ()) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, TEMPLATE/SYSTEM when the family is known,
    a stop parameter per stop token, then `parameters`."""
    lines = [f"# Ollama Modelfile written by the appliance{f' for {source}' if source else ''}.",
             "# Use: ollama create <name> -f <this file> (FROM is relative to this file's folder)",
             f"FROM ./{gguf_name}"]
    if template is None:
        lines += ["# TEMPLATE left out: the model's chat template is not one the appliance can translate",
                  "# exactly, so Ollama uses the chat template stored in the GGUF (tokenizer.chat_template)."]
    else:
        lines += [f"# TEMPLATE: {template.family}; {_claim(template)}",
                  f"TEMPLATE {_triple(template.template, 'template')}"]
        if template.system is not None:
            lines += ["# SYSTEM: the default system prompt the model's template adds when none is given.",
                      f"SYSTEM {_triple(template.system, 'default system prompt')}"]
    lines += [f"PARAMETER stop {_quoted(s, 'stop token')}" for s in stop_tokens]
    lines += [f"PARAMETER {k} {_number(v)}" for k, v in (parameters or {}).items()]
    for text in licences:  # the base model's and the data's licence texts, as Ollama shows them
        if '"""' in text:
            lines.append("# LICENSE left out: its text contains \"\"\" (see the export's licenses/)")
        else:
            lines.append(f"LICENSE {_triple(text, 'licence')}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, model_dir: Path, *, out: Path | None = None,
                    spec: ChatSpec | None = None, tokenizer: Any = None, meta: dict[str, Any] | None = None,
                    max_ctx: int = 4096, licences: Sequence[str] = ()) -> Path:
    """Write `<gguf stem>.Modelfile` beside the GGUF (or `out`) for `ollama create`; num_ctx is the
    model's context length capped at `max_ctx`."""
    from appliance import chat
    from export.gguf import chat_spec, read_metadata

    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    tokenizer = tokenizer if tokenizer is not None else hfmodel.load_tokenizer(model_dir)
    spec = spec or chat_spec(model_dir, tokenizer)
    meta = meta if meta is not None else read_metadata(gguf_path)
    jinja = meta.get("tokenizer.chat_template") or spec.template
    strip = tokenizer.bos_token if meta.get("tokenizer.ggml.add_bos_token") else None
    found = ollama_template(lambda m: chat.render(tokenizer, m, generation_prompt=True, template=jinja),
                            strip_prefix=strip)
    params = generation_parameters(model_dir)
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context:
        params["num_ctx"] = min(int(context), max_ctx)
    text = modelfile_text(gguf_path.name, template=found, stop_tokens=spec.stop_tokens, parameters=params,
                          source=model_dir.name, licences=licences)
    out = out or gguf_path.with_name(gguf_path.stem + ".Modelfile")
    atomic_write_text(out, text)
    return out
