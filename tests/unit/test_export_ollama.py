"""Ollama export logic that needs no model: the Go template subset against Ollama's own examples,
template-family detection against real Jinja chat templates, and the Modelfile (read back with a port
of Ollama's Modelfile parser)."""
# ruff: noqa: E501  (chat templates are quoted as their models publish them, long lines included)

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.errors import ValidationError
from export import ollama

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Chat templates as their models publish them (tools and edge branches trimmed where noted).
QWEN25 = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
CHATML_PLAIN = r"""{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"""
LLAMA3 = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %}"""
LLAMA31_DATED = r"""{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}{{- "Cutting Knowledge Date: December 2023\n" }}{{- "Today Date: 26 Jul 2024\n\n" }}{{- system_message }}{{- "<|eot_id|>" }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- endif %}
{%- endfor %}
"""
GEMMA = r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""

TWO_TURNS = [{"role": "user", "content": "Hi there."},
             {"role": "assistant", "content": "Hello! How can I help?"},
             {"role": "user", "content": "Tell me a joke.\nA short one."}]


def jinja(template: str, bos: str = "<s>", eos: str = "</s>") -> Callable[[list[dict[str, str]]], str]:
    """Render like transformers' apply_chat_template(add_generation_prompt=True)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages: compiled.render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """A port of Ollama's parser.ParseFile (parser/parser.go): (command, argument) pairs, with FROM
    as "model" and PARAMETER as its parameter name. MESSAGE is not supported."""
    valid = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
             "parameter", "requires"}
    commands: list[tuple[str, str]] = []
    state, buf, name = "nil", "", ""

    def unquote(s: str) -> tuple[str, bool]:
        if s.startswith('"""'):
            return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
        if s.startswith('"'):
            return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
        return s, True

    def step(ch: str) -> tuple[str, str]:
        if state == "nil":
            return ("comment", "") if ch == "#" else ("nil", "") if ch in " \t\r\n" else ("name", ch)
        if state == "name":
            if ch.isascii() and ch.isalpha():
                return "name", ch
            if ch in " \t":
                return "value", ""
            raise ValueError(f"invalid command character {ch!r}")
        if state == "parameter":
            if ch.isascii() and (ch.isalnum() or ch == "_"):
                return "parameter", ch
            if ch in " \t":
                return "value", ""
            raise ValueError("unexpected end of parameter name")
        if state == "value":
            return ("nil", ch) if ch in " \t\r\n" else ("value", ch)
        return ("nil", "") if ch in "\r\n" else ("comment", "")  # comment

    for ch in text:
        nxt, keep = step(ch)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                if word not in valid:
                    raise ValueError(f"invalid command {buf!r}")
                name, nxt = ("model", nxt) if word == "from" else (name, "parameter") \
                    if word == "parameter" else (word, nxt)
            elif state == "parameter":
                name = buf
            elif state == "value":
                value, ok = unquote(buf.strip())
                if not ok or keep in " \t":
                    buf += keep
                    continue
                commands.append((name, value))
            buf, state = "", nxt
        if keep and keep.isprintable():
            buf += keep
    if state == "value":
        value, ok = unquote(buf.strip())
        if not ok:
            raise ValueError("unexpected end of file in a quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    if not any(c == "model" for c, _ in commands):
        raise ValueError("no FROM line")
    return commands


# -- the Go template subset, on Ollama's own test cases (template/template_test.go) --------------
OLLAMA_MESSAGES = [{"role": "user", "content": "Hello friend!"},
                   {"role": "assistant", "content": "Hello human!"},
                   {"role": "user", "content": "What is your name?"}]
OLLAMA_SYSTEM = [{"role": "system", "content": "You are a helpful assistant!"}, *OLLAMA_MESSAGES]


def test_go_subset_matches_ollamas_chatml_example() -> None:
    template = """
{{- range $index, $_ := .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
    assert ollama.render_ollama(template, OLLAMA_SYSTEM) == (
        "<|im_start|>system\nYou are a helpful assistant!<|im_end|>\n"
        "<|im_start|>user\nHello friend!<|im_end|>\n"
        "<|im_start|>assistant\nHello human!<|im_end|>\n"
        "<|im_start|>user\nWhat is your name?<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.parametrize(("messages", "expected"), [
    (OLLAMA_MESSAGES, "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    (OLLAMA_SYSTEM, "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is "
                    "your name?[/INST] "),
])
def test_go_subset_matches_ollamas_mistral_example(messages: list[dict[str, str]], expected: str) -> None:
    template = """[INST] {{ if .System }}{{ .System }}

{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}
{{- end }}"""
    assert ollama.render_ollama(template, messages) == expected


def test_go_subset_semantics() -> None:
    render = ollama.render_go_template
    branches = "{{ if and .A (not .B) }}yes{{ else if .B }}b{{ else }}no{{ end }}"
    assert render(branches, {"A": "x", "B": ""}) == "yes"
    assert render(branches, {"A": "", "B": "x"}) == "b"
    assert render('{{ or .A .B "z" }}|{{ and .A .B }}', {"A": "", "B": 0}) == "z|"
    indexed = "{{ range $i, $m := .L }}{{ $i }}={{ $m }};{{ else }}empty{{ end }}"
    assert render(indexed, {"L": ["a", "b"]}) == "0=a;1=b;"
    assert render("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}) == "empty"
    funcs = "{{ len (slice .L 1) }} {{ eq .N 1 2 }} {{ ne .N 2 }}"
    assert render(funcs, {"L": [1, 2, 3], "N": 2}) == "2 true false"
    assert render("a  \n {{- .X -}} \n  b", {"X": "!"}) == "a!b"
    assert render("{{ $.X }}{{ .Missing }}", {"X": "root"}) == "root<no value>"


@pytest.mark.parametrize("bad", ["{{ if .A }}open", "{{ end }}", "{{ printf .A }}", "{{ .A | len }}",
                                 "{{ range $i := }}{{ end }}"])
def test_go_subset_rejects_what_it_does_not_implement(bad: str) -> None:
    with pytest.raises(ollama.GoTemplateError):
        ollama.render_go_template(bad, {"A": "x"})


def test_open_assistant_turn_is_continued_not_closed() -> None:
    """Ollama renders a trailing assistant message as a prefill: the turn stays open."""
    text = ollama.render_ollama(ollama.OLLAMA_TEMPLATES["chatml"], [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": "Well,"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nWell,"


# -- family detection on real templates -----------------------------------------------------------
@pytest.mark.parametrize(("template", "strip", "family", "system"), [
    ((FIXTURES / "smollm2-tokenizer" / "chat_template.jinja").read_text(), None, "chatml", SMOL_SYSTEM),
    (QWEN25, None, "chatml", QWEN_SYSTEM),
    (CHATML_PLAIN, None, "chatml", None),
    (LLAMA3, "<|begin_of_text|>", "llama3", None),
    (MISTRAL_V03, "<s>", "mistral", None),
], ids=["smollm2", "qwen2.5", "chatml", "llama3", "mistral-v0.3"])
def test_known_families_are_recognised_and_render_like_jinja(template: str, strip: str | None, family: str,
                                                             system: str | None) -> None:
    bos = strip or "<s>"
    render = jinja(template, bos=bos)
    found = ollama.ollama_template(render, strip_prefix=strip)
    assert found is not None and (found.family, found.system) == (family, system)
    for convo in (TWO_TURNS, [{"role": "system", "content": "Be terse."}, *TWO_TURNS]):
        sent = convo if convo[0]["role"] == "system" or system is None else \
            [{"role": "system", "content": system}, *convo]  # what Ollama does with SYSTEM
        expected = render(convo).removeprefix(strip or "")
        assert ollama.render_ollama(found.template, sent) == expected


@pytest.mark.parametrize(("template", "strip"), [
    (GEMMA, "<bos>"),  # refuses a system turn
    (LLAMA31_DATED, "<|begin_of_text|>"),  # rewrites the system prompt (dates)
    (LLAMA3, None),  # BOS written as text, but the runtime would not add it
])
def test_unknown_or_inexact_families_get_no_template(template: str, strip: str | None) -> None:
    assert ollama.ollama_template(jinja(template, bos=strip or "<|begin_of_text|>"), strip_prefix=strip) is None


# -- the Modelfile ------------------------------------------------------------------------------
def test_modelfile_parses_with_ollamas_rules() -> None:
    found = ollama.ollama_template(jinja(QWEN25))
    text = ollama.modelfile_text("m-Q4_K_M.gguf", template=found, stop_tokens=["<|im_end|>", "<|endoftext|>"],
                               parameters={"temperature": 0.7, "top_k": 20, "num_ctx": 4096})
    commands = parse_modelfile(text)
    assert commands == [("model", "./m-Q4_K_M.gguf"), ("template", ollama.OLLAMA_TEMPLATES["chatml"]),
                        ("system", QWEN_SYSTEM), ("stop", "<|im_end|>"), ("stop", "<|endoftext|>"),
                        ("temperature", "0.7"), ("top_k", "20"), ("num_ctx", "4096")]


def test_modelfile_without_a_known_family_leaves_the_template_to_the_gguf() -> None:
    text = ollama.modelfile_text("m.gguf", template=None, stop_tokens=["<end_of_turn>"])
    assert "TEMPLATE" not in text.replace("# TEMPLATE", "") and "tokenizer.chat_template" in text
    assert parse_modelfile(text) == [("model", "./m.gguf"), ("stop", "<end_of_turn>")]


def test_modelfile_refuses_values_it_cannot_quote() -> None:
    with pytest.raises(ValidationError, match="stop token"):
        ollama.modelfile_text("m.gguf", template=None, stop_tokens=['say "end"'])
    bad = ollama.OllamaTemplate("chatml", ollama.OLLAMA_TEMPLATES["chatml"], 'Use """ quotes')
    with pytest.raises(ValidationError, match="system prompt"):
        ollama.modelfile_text("m.gguf", template=bad, stop_tokens=["<|im_end|>"])


def test_generation_parameters_only_when_the_model_samples(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}')
    assert ollama.generation_parameters(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                    "repeat_penalty": 1.05}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": 0.7}')
    assert ollama.generation_parameters(tmp_path) == {}
    assert ollama.generation_parameters(tmp_path / "missing") == {}


def test_ollama_module_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    code = ("import sys, export.ollama\n"
            "print(sorted({'torch', 'transformers', 'llama_cpp', 'numpy', 'textual', 'export.gguf'}"
            " & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


# -- whitespace edges: Ollama's Go templates cannot trim -------------------------------------------
PADDED = [{"role": "system", "content": "\n Be terse.\t"}, {"role": "user", "content": "  hi \n"},
          {"role": "assistant", "content": "\nHello! "}, {"role": "user", "content": " Ça va ? 😀 東京\u00a0\n\n"}]
EMPTY_SYSTEM = [{"role": "system", "content": ""}, {"role": "user", "content": "Hello."}]


def client_trimmed(messages: list[dict[str, str]], roles: tuple[str, ...]) -> list[dict[str, str]]:
    return [{**m, "content": m["content"].strip()} if m["role"] in roles else m for m in messages]


@pytest.mark.parametrize(("template", "strip", "trimmed"), [
    ((FIXTURES / "smollm2-tokenizer" / "chat_template.jinja").read_text(), None, ()),
    (QWEN25, None, ()),
    (CHATML_PLAIN, None, ()),
    (LLAMA3, "<|begin_of_text|>", ("system", "user", "assistant")),
    (MISTRAL_V03, "<s>", ("assistant",)),
], ids=["smollm2", "qwen2.5", "chatml", "llama3", "mistral-v0.3"])
def test_padded_and_empty_messages_render_like_jinja(template: str, strip: str | None,
                                                     trimmed: tuple[str, ...]) -> None:
    """Leading/trailing spaces and newlines, an empty system prompt and non-ASCII text: the Go
    template renders what the Jinja template renders, except that it cannot trim: a Jinja template
    that trims (Llama 3's `| trim`) is matched only for trimmed messages, and says so."""
    render = jinja(template, bos=strip or "<s>")
    found = ollama.ollama_template(render, strip_prefix=strip)
    assert found is not None and found.trimmed_roles == trimmed
    convos = [PADDED, PADDED[1:], EMPTY_SYSTEM]
    for convo in convos:
        sent = convo if convo[0]["role"] == "system" or found.system is None else \
            [{"role": "system", "content": found.system}, *convo]
        expected = render(convo).removeprefix(strip or "")
        assert ollama.render_ollama(found.template, client_trimmed(sent, trimmed)) == expected
        if trimmed and convo is not EMPTY_SYSTEM:  # what Ollama renders from untrimmed text differs
            assert ollama.render_ollama(found.template, sent) != expected
    text = ollama.modelfile_text("m.gguf", template=found, stop_tokens=["</s>"])
    if trimmed:
        assert "only for messages without leading or trailing whitespace" in text
        assert f"trims {', '.join(trimmed)} messages" in text
    else:
        assert "including messages with leading and trailing whitespace, an empty system prompt" in text
    assert parse_modelfile(text)[1] == ("template", found.template)


def test_a_template_that_trims_one_role_is_not_claimed_exact_for_others() -> None:
    """A Jinja template that trims user text but keeps assistant text must not be matched as if it
    trimmed everything."""
    trims_user = CHATML_PLAIN.replace("message['content']", "(message['content'] | trim "
                                      "if message['role'] == 'user' else message['content'])")
    found = ollama.ollama_template(jinja(trims_user))
    assert found is not None and found.trimmed_roles == ("user",)
    assert ollama.render_ollama(found.template, client_trimmed(PADDED, ("user",))) == jinja(trims_user)(PADDED)
