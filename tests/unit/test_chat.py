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
