"""GGUF export logic that needs no model: quantization type names, the tokenizer.json
normalization and the child-process runner. (The Ollama side is in test_export_ollama.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ApplianceError, RefusedError, ValidationError
from export import gguf


# -- quantization types ---------------------------------------------------------------------------
def test_quant_type_names() -> None:
    assert gguf.resolve_quant_type("q4_k_m") == ("Q4_K_M", 15)
    assert gguf.resolve_quant_type("Q4_K") == ("Q4_K_M", 15)
    assert gguf.resolve_quant_type("q8_0") == ("Q8_0", 7)
    assert {"Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "IQ4_XS", "F16", "BF16", "F32"} <= set(
        gguf.quant_types())


def test_unknown_quant_type_lists_the_valid_ones() -> None:
    with pytest.raises(ValidationError) as info:
        gguf.resolve_quant_type("Q7_X")
    assert "Q7_X" in info.value.message
    assert all(name in info.value.hint for name in ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"))


def test_types_the_appliance_cannot_do_well_are_refused() -> None:
    with pytest.raises(RefusedError, match="ternary"):
        gguf.resolve_quant_type("TQ1_0")


@pytest.mark.parametrize("name", ["iq2_xxs", "IQ1_S", "Q2_K_S", "IQ3_XXS"])
def test_types_that_need_an_imatrix_resolve_but_are_refused_without_one(name: str, tmp_path: Path) -> None:
    key, _ = gguf.resolve_quant_type(name)
    assert key in gguf.NEEDS_IMATRIX and gguf.imatrix_helps(key)
    with pytest.raises(RefusedError, match="needs an importance matrix") as info:
        gguf.quantize(tmp_path / "none.gguf", tmp_path / "out.gguf", name)  # before any file is read
    assert "--imatrix" in (info.value.hint or "")


def test_an_imatrix_is_made_for_the_types_below_six_bits() -> None:
    below = {"Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q4_0", "Q3_K_M", "Q2_K"}
    assert all(gguf.imatrix_helps(t) for t in below)
    assert not any(gguf.imatrix_helps(t) for t in ("Q6_K", "Q8_0", "F16", "BF16", "F32"))


# -- tokenizer.json normalization ---------------------------------------------------------------
HYBRID = {
    "model": {"type": "BPE", "byte_fallback": True, "vocab": {"Ġthe": 0, "a": 1}, "merges": []},
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                      "use_regex": True},
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]},
}


def test_byte_level_bpe_with_sentencepiece_leftovers_is_normalized() -> None:
    fixed = gguf.normalized_tokenizer_json(HYBRID)
    assert fixed is not None and fixed["model"]["byte_fallback"] is False
    assert fixed["decoder"]["type"] == "ByteLevel" and fixed["pre_tokenizer"] == HYBRID["pre_tokenizer"]
    assert HYBRID["model"]["byte_fallback"] is True  # the input is not modified


def test_normalization_leaves_other_tokenizers_alone() -> None:
    with_bytes = {**HYBRID, "model": {**HYBRID["model"], "vocab": {"<0x0A>": 0, "a": 1}}}
    sentencepiece = {**HYBRID, "pre_tokenizer": {"type": "Metaspace"}}
    plain = gguf.normalized_tokenizer_json(HYBRID)
    for data in (with_bytes, sentencepiece, plain):
        assert gguf.normalized_tokenizer_json(data) is None


# -- child processes ------------------------------------------------------------------------------
def test_child_output_is_streamed_and_a_hung_child_is_stopped() -> None:
    lines: list[str] = []
    result = gguf._run_python("print('one'); print('two', flush=True)", [], lines.append, what="echo")
    assert (result.returncode, lines, result.tail) == (0, ["one", "two"], ["one", "two"])
    with pytest.raises(ApplianceError, match="sleeper was still running after 1 s") as info:
        gguf._run_python("import time; time.sleep(60)", [], lines.append, what="sleeper", timeout=1)
    assert info.value.title == "Timed out"


def test_export_module_imports_no_heavy_library() -> None:
    import subprocess
    import sys

    code = ("import sys, export.gguf\n"
            "print(sorted({'torch', 'transformers', 'llama_cpp', 'numpy', 'textual'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


# -- what the converter sees --------------------------------------------------------------------
def _sentencepiece_model() -> bytes:
    import io

    import sentencepiece as spm

    lines = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=40,
                                   minloglevel=2)
    return out.getvalue()


def _merged_folder(tmp_path: Path, tokenizer_model: bytes) -> Path:
    import json

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    (folder / "tokenizer.model").write_bytes(tokenizer_model)
    return folder


def test_the_converter_never_sees_a_tokenizer_model_that_is_not_sentencepiece(tmp_path: Path) -> None:
    folder = _merged_folder(tmp_path, b"GGUF\x03\x00\x00\x00" + bytes(64))
    with gguf._converter_source(folder, tmp_path) as source:
        assert source != folder
        assert not (source / "tokenizer.model").exists()
        assert (source / "config.json").read_text() == (folder / "config.json").read_text()
        assert (source / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
    assert (folder / "tokenizer.model").exists()  # the model folder itself is never changed
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the view is gone


def test_a_sentencepiece_tokenizer_model_is_what_the_converter_reads(tmp_path: Path) -> None:
    folder = _merged_folder(tmp_path, _sentencepiece_model())
    with gguf._converter_source(folder, tmp_path) as source:
        assert source == folder
