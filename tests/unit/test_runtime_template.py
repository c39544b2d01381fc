"""The runtime renders chat templates without transformers: same text, same ids as transformers'
`apply_chat_template` (SmolLM2's real tokenizer and template, and templates that use each feature
transformers provides), plus message validation and the stop-string holdback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.errors import ValidationError
from appliance.runtime.template import (
    ChatTemplate,
    StopText,
    TemplateRenderError,
    check_messages,
    special_tokens_from_config,
)
from tests.conftest import TOKENIZER_DIR

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "  Prix : 1234,50 €\n\n\tnaïve café 😀 <b>&</b> "},
     {"role": "assistant", "content": "D'accord."}, {"role": "user", "content": ""}],
]
FEATURES = {  # each line uses one thing transformers' environment provides
    "trim_and_lstrip": "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n"
                       "    {% else %}\nA: {{ m.content }}\n    {% endif %}\n{% endfor %}",
    "tojson": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
    "loopcontrols": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
                    "{% endfor %}",
    "special_tokens": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
                      "{{ unk_token }}{{ pad_token }}",
    "generation_block": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}",
    "namespace_and_prompt": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                            "{% endfor %}{{ ns.n }}{% if add_generation_prompt %}>{% endif %}",
    "autoescape_block": "{% autoescape true %}<b>{{ messages[0].content }}</b>"
                        "{{ '<i>' ~ messages[0].content }}{% set t %}<u>{{ messages[0].content }}</u>"
                        "{% endset %}{{ t }}{% endautoescape %}"
                        "<b>{{ messages[0].content ~ '&' }}</b>",
    "filters_and_methods": "{% for m in messages %}{{ m.content | replace(' ', '_') | upper | indent(2) }}"
                           "{{ [m.role, m.content] | join('|') }}{{ '%s:%d' | format(m.role, loop.index) }}"
                           "{{ '{}/{}'.format(loop.index, loop.length) }}{{ m.content.split(' ') | length }}"
                           "{{ (m.content * 2)[1:-1] }}{{ m.content | wordwrap(5) }}{% endfor %}",
}


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def smol_template() -> ChatTemplate:
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    source = (TOKENIZER_DIR / "chat_template.jinja").read_text()
    return ChatTemplate(source, special_tokens_from_config(config))


@pytest.mark.parametrize("prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_smollm2_renders_and_tokenizes_like_transformers(hf_tokenizer: Any, smol_template: ChatTemplate,
                                                         index: int, prompt: bool) -> None:
    from tokenizers import Tokenizer

    messages = CONVERSATIONS[index]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    text = smol_template.render(messages, generation_prompt=prompt)
    assert text == expected
    ids = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids
    assert ids == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_template_features_match_transformers(hf_tokenizer: Any, smol_template: ChatTemplate,
                                              name: str) -> None:
    template = ChatTemplate(FEATURES[name], smol_template.variables)
    for messages in CONVERSATIONS:
        expected = hf_tokenizer.apply_chat_template(messages, chat_template=FEATURES[name], tokenize=False,
                                                    add_generation_prompt=True)
        assert template.render(messages) == expected


def test_strftime_now_and_raise_exception() -> None:
    import datetime

    assert ChatTemplate("{{ strftime_now('%Y') }}").render([]) == str(datetime.date.today().year)
    failing = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}"
                           "{% endif %}ok")
    assert failing.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateRenderError, match="user first"):
        failing.render([{"role": "assistant", "content": "x"}])


def test_the_sandbox_refuses_unsafe_templates() -> None:
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateRenderError):
        evil.render([{"role": "user", "content": "x"}])
    probe = ChatTemplate("{% set x = messages.append(1) %}")
    with pytest.raises(TemplateRenderError):  # immutable: a template cannot change the conversation
        probe.render([{"role": "user", "content": "x"}])


def test_bad_templates_are_clear_errors() -> None:
    with pytest.raises(TemplateRenderError, match="carries no chat template"):
        ChatTemplate("")
    with pytest.raises(TemplateRenderError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_special_tokens_accept_added_token_dicts() -> None:
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "pad_token": None,
              "additional_special_tokens": [{"content": "<x>"}, "<y>"]}
    assert special_tokens_from_config(config) == {"bos_token": "<s>", "eos_token": "</s>",
                                                  "additional_special_tokens": ["<x>", "<y>"]}


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"), ("hi", "non-empty list"), ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user", "content": 3}], "content of type int"), ([["user", "x"]], "message 0 is not"),
    ([{"role": "user"}], "content of type NoneType"),
])
def test_messages_are_validated(messages: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        check_messages(messages)


def test_messages_are_copied_without_extra_fields() -> None:
    given = [{"role": "user", "content": "x", "interrupted": True}]
    assert check_messages(given) == [{"role": "user", "content": "x"}]


def _run(stop: StopText, pieces: list[str]) -> tuple[list[str], str]:
    shown = [stop.push(p) for p in pieces]
    return shown, "".join(shown) + stop.flush()


def test_stop_text_holds_back_what_may_become_a_stop_string() -> None:
    shown, total = _run(StopText(["###", "User:"]), ["Hello", " #", "#", " no", " Us", "er", ": x"])
    assert shown == ["Hello", " ", "", "## no", " ", "", ""]
    assert total == "Hello ## no "


def test_stop_text_without_a_stop_string_flushes_the_held_tail() -> None:
    shown, total = _run(StopText(["STOP"]), ["a S", "T"])
    assert shown == ["a ", ""] and total == "a ST"
    assert _run(StopText([]), ["a", "b"]) == (["a", "b"], "ab")


def test_stop_text_stops_inside_one_piece_and_ignores_the_rest() -> None:
    stop = StopText(["\n\n"])
    assert stop.push("one\n\ntwo") == "one" and stop.stopped
    assert stop.push("more") == "" and stop.flush() == ""



# -- bounded rendering: a template is untrusted input that arrives with a model --------------------
TEMPLATE_DIR = TOKENIZER_DIR.parent / "chat_templates"
M = "messages[0].content"  # "hi": values the compiler cannot fold, so the render must stop them
BOMBS = {  # template -> the RenderLimits field that must stop it
    "{{ 'x' * 10**10 }}": "value_size",  # grew an import to 20.8 GB (folded at compile time)
    f"{{{{ {M} * 10**10 }}}}": "value_size",
    "{{ 10 ** (10 ** 10) }}": "int_bits",
    f"{{{{ ({M}|length) ** (10 ** 10) }}}}": "int_bits",
    "{% set r = range(99999) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}": "steps",
    "{% for i in range(99999) recursive %}{% if loop.depth < 3 %}{{ loop(range(99999)) }}{% endif %}"
    "{% endfor %}": "steps|cpu_seconds",  # ~2 us a step: on a loaded box the CPU bound may come first
    f"{{% set ns = namespace(s={M}) %}}{{% for i in range(64) %}}{{% set ns.s = ns.s ~ ns.s %}}"
    "{% endfor %}": "value_size",
    f"{{% set ns = namespace(s={M}) %}}{{% for i in range(64) %}}{{% set ns.s = ns.s + ns.s %}}"
    "{% endfor %}": "value_size",
    f"{{% set s = {M} * 2000000 %}}{{% for i in range(99999) %}}{{{{ s }}}}{{% endfor %}}": "output_chars",
    f"{{% set s = {M} * 2000000 %}}{{% set ns = namespace(l=[]) %}}{{% for i in range(999) %}}"
    "{% set ns.l = ns.l + [s ~ i] %}{% endfor %}": "produced",
    f"{{% set s = {M} * 2000000 %}}{{% for i in range(999) %}}{{% set t %}}{{{{ s }}}}{{{{ s }}}}"
    "{% endset %}{% endfor %}": "produced",
    f"{{% set ns = namespace(l=[{M}]) %}}{{% for i in range(64) %}}{{% set ns.l = [ns.l, ns.l] %}}"
    "{% endfor %}{{ ns.l }}": "value_size",
    f"{{% set s = {M} * 500000 %}}{{{{ ([s] * 1000) | join }}}}": "value_size",
    f"{{{{ {M} | center(10000000000) }}}}": "value_size",
    "{{ 'x' | center(1000000000) }}": "value_size",  # folded at compile time
    f"{{{{ ({M} * 1000) | replace('', 'y' * 1000000) }}}}": "value_size",
    f"{{{{ (({M} ~ '\\n') * 1000000) | indent(100) }}}}": "value_size",
    f"{{{{ ({M} ~ '%999999999d') % 1 }}}}": "value_size",
    f"{{{{ ({M} ~ '{{:>999999999}}').format(1) }}}}": "value_size",
    f"{{{{ ({M} ~ '\t' * 1000000).expandtabs(1000) }}}}": "value_size",
    "{{ messages | tojson(indent=100000000) }}": "value_size",
    "{{ lipsum(100000, max=100000) }}": "value_size",
    f"{{{{ {M} | slice(10000000) | list }}}}": "value_size",
    "x" * ((1 << 20) + 1): "source_chars",
}
FOLDED = {"{{ 'x' * 10**10 }}", "{{ 10 ** (10 ** 10) }}", "{{ 'x' | center(1000000000) }}"}


def test_template_bombs_stop_at_a_named_bound_with_little_memory() -> None:
    """Each bomb, in a child limited to 2 GiB of address space: the render stops at the expected
    bound (before the fix: MemoryError, or minutes of looping), and the child stays small."""
    import subprocess
    import sys

    code = r'''
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (300, 300))  # a bomb stuck in C (10 ** 10 ** 10) ends here
def alarm(*_): raise TimeoutError("still rendering after 60 s")
signal.signal(signal.SIGALRM, alarm)
from appliance.runtime.template import ChatTemplate
for bomb in json.loads(sys.stdin.read()):
    signal.alarm(60)
    try:
        ChatTemplate(bomb).render([{"role": "user", "content": "hi"}])
        result = "rendered"
    except BaseException as exc:
        result = f"{type(exc).__name__}: {str(exc)[:300]}"
    signal.alarm(0)
    print(json.dumps(result), flush=True)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report pytest's own peak
print(json.dumps(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])))
'''
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(BOMBS)), capture_output=True,
                         text=True, timeout=1800, cwd=TOKENIZER_DIR.parents[2])
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == len(BOMBS) + 1, out.stderr[-2000:]
    for (bomb, bound), result in zip(BOMBS.items(), lines, strict=False):
        assert result.startswith("TemplateRenderError: the chat template ") and \
            any(f"(limit {b})" in result for b in bound.split("|")), (bomb[:80], result)
        assert ("is refused: the constant expression on line 1" in result) == (bomb in FOLDED), result
    # The build budget is 256 Mi characters summed over a render: 280-575 MB peak seen (the
    # allocator keeps freed strings' pages), against the 20.8 GB the issue measured.
    assert lines[-1] < 1024 * 1024, f"peak RSS {lines[-1]} KiB"


def test_limits_are_per_render_and_can_be_tightened() -> None:
    from appliance.runtime.template_limits import RenderLimits

    loop = "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}"
    tight = ChatTemplate(loop, limits=RenderLimits(steps=100), origin="my template")
    assert tight.render([{"role": "user", "content": "x" * 30}]) == "x" * 30  # ~60 steps
    assert tight.render([{"role": "user", "content": "x" * 30}]) == "x" * 30  # a fresh budget
    with pytest.raises(TemplateRenderError, match=r"^my template was stopped .* \(limit steps\)"):
        tight.render([{"role": "user", "content": "x" * 80}])
    cpu = ChatTemplate("{% set s = 'ab' * 1000000 %}{% for i in range(99999) %}{% if 'zz' in s %}"
                       "{% endif %}{% endfor %}", limits=RenderLimits(cpu_seconds=0.05))
    with pytest.raises(TemplateRenderError, match=r"\(limit cpu_seconds\)"):
        cpu.render([])


def test_a_bounded_render_outside_render_fails_closed() -> None:
    from appliance.runtime import template_limits

    with pytest.raises(template_limits.RenderLimitError):
        template_limits.current()


def _long_conversation(turns: int, size: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        question = f"  question {i}: " + "naïve café 😀 " * (size // 14) + "\n"
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": f"answer {i} " + "x" * size}]
    return [*messages, {"role": "user", "content": "last one?"}]


@pytest.mark.parametrize("path", sorted(TEMPLATE_DIR.glob("*.jinja")), ids=lambda p: p.stem)
def test_real_templates_render_long_conversations_like_transformers(path: Any) -> None:
    """Llama-3.1/3.2 (with their tool branches), Qwen2.5/3, Phi-3.5 and Mistral Nemo over a
    conversation of ~1M characters (a 128k-token context several times over): the same text as
    transformers' own environment, and far from every limit."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from appliance.runtime import template_limits

    source = path.read_text()
    variables = {"bos_token": "<s>", "eos_token": "</s>"}
    messages = _long_conversation(700, 800)
    expected = _compile_jinja_template(source).render(messages=messages, tools=None, documents=None,
                                                      add_generation_prompt=True, **variables)
    spent: list[template_limits.Budget] = []

    class Recording(template_limits.Budget):
        def __init__(self, limits: template_limits.RenderLimits) -> None:
            super().__init__(limits)
            spent.append(self)

    template = ChatTemplate(source, variables)
    original = template_limits.Budget
    template_limits.Budget = Recording  # type: ignore[misc]
    try:
        assert template.render(messages) == expected
    finally:
        template_limits.Budget = original  # type: ignore[misc]
    limits = template_limits.DEFAULT_LIMITS
    assert len(expected) > 1_000_000
    assert spent[0].steps < limits.steps / 50 and spent[0].produced < limits.produced / 10
    assert len(expected) * 4 < limits.output_chars
