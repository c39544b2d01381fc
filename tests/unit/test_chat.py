"""render_and_mask on a tiny word-level tokenizer whose ids can be checked by eye."""

from __future__ import annotations

import pytest

from appliance import chat

VOCAB = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "user": 3, "assistant": 4, "system": 5,
         "hi": 6, "hello": 7, "there": 8, "bye": 9, "be": 10, "nice": 11}
CHATML = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
X = chat.IGNORE_INDEX


def make_tokenizer(template: str = CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=template)


def test_labels_cover_assistant_tokens_and_their_end_token_only() -> None:
    messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "bye"}]
    out = chat.render_and_mask(make_tokenizer(), messages, ["<|im_end|>"])
    assert out.input_ids == [1, 5, 10, 11, 2, 1, 3, 6, 2, 1, 4, 7, 8, 2, 1, 3, 9, 2, 1, 4, 9, 2]
    assert out.labels == [X, X, X, X, X, X, X, X, X, X, X, 7, 8, 2, X, X, X, X, X, X, 9, 2]
    assert out.trained_tokens == 5


def test_system_and_user_turns_are_never_trained() -> None:
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    out = chat.render_and_mask(make_tokenizer(), messages, ["<|im_end|>"])
    assert out.input_ids == [1, 3, 7, 2, 1, 4, 6, 2]
    assert out.labels == [X, X, X, X, X, X, 6, 2]


def test_template_without_stop_token_is_refused() -> None:
    template = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}" \
               "{% if add_generation_prompt %}assistant {% endif %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(chat.TemplateError, match="does not end assistant turn 1 with a stop token"):
        chat.render_and_mask(make_tokenizer(template), messages, ["<|im_end|>"])


def test_template_that_rewrites_earlier_turns_is_refused() -> None:
    template = "{% for m in messages %}{% if loop.last %}system {% endif %}" \
               "<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}" \
               "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(chat.TemplateError, match="not prefix-stable at message 1"):
        chat.render_and_mask(make_tokenizer(template), messages, ["<|im_end|>"])


def test_template_that_raises_becomes_a_template_error() -> None:
    template = "{{ raise_exception('no system role') }}"
    with pytest.raises(chat.TemplateError, match="no system role"):
        chat.render(make_tokenizer(template), [{"role": "system", "content": "hi"}])


def test_render_is_bounded_before_transformers_would_render() -> None:
    """Training, import and export render through the bounded ChatTemplate: a template bomb stops
    at a named bound (transformers' environment built the 100 MB string, or 10 GB for 10**10)."""
    bomb = make_tokenizer("{{ 'x' * 10**8 }}")
    with pytest.raises(chat.TemplateError, match=r"chat template of .* \(limit value_size\)"):
        chat.render(bomb, [{"role": "user", "content": "hi"}])
    loops = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}" + CHATML
    with pytest.raises(chat.TemplateError, match=r"\(limit steps\)"):
        chat.render_and_mask(make_tokenizer(loops), [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}],
                             ["<|im_end|>"])
    with pytest.raises(chat.TemplateError, match=r"^the given chat template .* \(limit value_size\)"):
        chat.render(make_tokenizer(), [{"role": "user", "content": "hi"}], template="{{ 'x' * 10**9 }}")


def test_render_gives_the_text_transformers_gives() -> None:
    template = ("{{ bos_token }}{% for m in messages %}{{ additional_special_tokens[0] }} {{ m.role }} "
                "{{ m.content | trim }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}"
                "{{ additional_special_tokens[0] }} assistant {% endif %}{{ unk_token }}")
    tokenizer = make_tokenizer({"default": template, "tool_use": "unused"})
    tokenizer.bos_token = "<unk>"
    messages = [{"role": "system", "content": " be  nice\n"}, {"role": "user", "content": "hi"}]
    for prompt in (True, False):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert chat.render(tokenizer, messages, generation_prompt=prompt) == expected
    assert chat.count_tokens(tokenizer, messages) == len(tokenizer.apply_chat_template(messages))
    with pytest.raises(chat.TemplateError, match="chat template"):
        chat.render(make_tokenizer(None), messages)  # type: ignore[arg-type]
