"""The template + mask function on the real SmolLM2 tokenizer, against hand-checked ids."""

from __future__ import annotations

import pytest

from appliance import chat

pytestmark = pytest.mark.integration
X = chat.IGNORE_INDEX


def test_smollm2_chatml_ids_and_labels(smol_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    out = chat.render_and_mask(smol_tokenizer, messages, ["<|im_end|>"])
    assert out.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\nHello!<|im_end|>\n")
    # <|im_start|>=1 system=9690 \n=198 Be=6077 " brief"=5453 .=30 <|im_end|>=2 user=4093 Hi=26843
    # ass=520 istant=9531 Hello=19556 !=17: checked by decoding each id.
    assert out.input_ids == [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198,
                             1, 520, 9531, 198, 19556, 17, 2, 198]
    assert out.labels == [X] * 18 + [19556, 17, 2, X]  # "Hello!" + <|im_end|>, not the newline
    assert smol_tokenizer.convert_ids_to_tokens([19556, 17, 2]) == ["Hello", "!", "<|im_end|>"]


def test_smollm2_multi_turn_trains_every_assistant_turn(smol_tokenizer) -> None:
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    out = chat.render_and_mask(smol_tokenizer, messages, ["<|im_end|>"])
    trained = [t for t in out.labels if t != X]
    assert smol_tokenizer.decode(trained) == "4<|im_end|>6<|im_end|>"
    assert len(out.spans) == 2


def test_hf_tokenizer_matches_llama_cpp_on_rendered_chat(smol_model, smol_tokenizer) -> None:
    import llama_cpp

    messages = [{"role": "user", "content": "Grüße aus Köln — 3 × 4 = 12? 🙂"},
                {"role": "assistant", "content": "Ja.\n\n  Tabs\tand spaces."}]
    text = chat.render(smol_tokenizer, messages)
    gguf = smol_model.path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert smol_tokenizer(text, add_special_tokens=False)["input_ids"] == theirs
