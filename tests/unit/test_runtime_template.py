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

