"""GGUF export on real files: the embedded SmolLM2 (converted once, quantized to four types), the
tiny Qwen2 (biases, tied embeddings) against transformers, and every failure an operator can meet:
an unknown tokenizer, an unknown type, truncated or corrupt files, a wrong template or stop id."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance import chat, manifest
from appliance.errors import ApplianceError, IntegrityError, RefusedError, ValidationError
from appliance.workspace import ArtifactRecord
from export import gguf, ollama
from tests.tmpdirs import ModuleTemp
from tests.unit.test_export_ollama import parse_modelfile

pytestmark = pytest.mark.integration
QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15}
QUESTION = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
TIMINGS: dict[str, float] = {}


# The whole GGUF export of a model folder, as the export stage does it but without a workspace:
# convert once, quantize to each type, check every file, write a Modelfile per file.
@dataclasses.dataclass
class GgufExport:
    path: Path
    qtype: str
    modelfile: Path | None
    check: dict[str, Any]


def export_gguf(model_dir: Path, out_dir: Path, quants: Sequence[str], *, nthread: int | None = None,
                progress: Callable[[str], None] | None = None) -> list[GgufExport]:
    from appliance.stages.models import importer as models

    names = [gguf.resolve_quant_type(q)[0] for q in quants]  # fail fast, before minutes of converting
    say = progress or (lambda _: None)
    tokenizer = models.load_tokenizer(model_dir)
    spec = gguf.chat_spec(model_dir, tokenizer)
    base = gguf.convert(model_dir, out_dir / f"{model_dir.name}-F16.gguf", outtype="f16", progress=say)
    files = [(base, "F16")] + [(out_dir / f"{model_dir.name}-{q}.gguf", q) for q in names if q != "F16"]
    results = []
    for path, qtype in files:
        if path != base:
            gguf.quantize(base, path, qtype, nthread=nthread, progress=say)
        say(f"checking {path.name}")
        meta = gguf.read_metadata(path)
        check = gguf.check_gguf(path, model_dir, spec=spec, tokenizer=tokenizer, meta=meta)
        modelfile = ollama.write_modelfile(path, model_dir, spec=spec, tokenizer=tokenizer, meta=meta)
        results.append(GgufExport(path, qtype, modelfile, check))
    return results


@dataclasses.dataclass
class Exported:
    files: dict[str, GgufExport]
    lines: list[str]
    out: Path


@pytest.fixture(scope="module")
def exported(smol_model: ArtifactRecord, module_tmp: ModuleTemp) -> Exported:
    """SmolLM2 -> F16 once, then the four quantized types; every file checked by export_gguf."""
    out = module_tmp.mktemp("gguf")
    lines: list[str] = []
    start = time.monotonic()
    results = export_gguf(smol_model.path, out, QUANTS, nthread=2, progress=lines.append)
    TIMINGS["smol export (convert F16 + 4 quants + 5 checks + Modelfiles)"] = time.monotonic() - start
    return Exported({r.qtype: r for r in results}, lines, out)


@pytest.fixture(scope="module")
def tiny_qwen2_gguf(tiny_qwen2_source: Path, module_tmp: ModuleTemp) -> Path:
    out = module_tmp.mktemp("qwen2") / "tiny-qwen2-F32.gguf"
    start = time.monotonic()
    gguf.convert(tiny_qwen2_source, out, outtype="f32")
    TIMINGS["tiny qwen2 convert (f32)"] = time.monotonic() - start
    return out


@pytest.fixture(scope="module")
def qwen2_tokenizer(tiny_qwen2_source: Path) -> Any:
    from appliance.stages.models.importer import load_tokenizer

    return load_tokenizer(tiny_qwen2_source)


@pytest.fixture(scope="module", autouse=True)
def _report_timings() -> Any:
    yield
    if TIMINGS:
        print("\n" + "\n".join(f"  {k}: {v:.1f} s" for k, v in TIMINGS.items()))


# -- SmolLM2 --------------------------------------------------------------------------------------
def test_export_writes_one_checked_file_per_type(exported: Exported, smol_model: ArtifactRecord) -> None:
    assert list(exported.files) == ["F16", *QUANTS]
    sizes = [r.path.stat().st_size for r in exported.files.values()]
    assert sizes == sorted(sizes, reverse=True), sizes  # each type smaller than the one before
    for qtype, result in exported.files.items():
        check = result.check
        assert check["file_type"] == FILE_TYPES[qtype]
        assert check["tokenizer"]["model"] == "gpt2" and check["tokenizer"]["pre"] == "smollm"
        assert check["tokenizer"]["add_bos"] is False and check["tokenizer"]["tokens_compared"] > 50
        assert check["eos_token_id"] == 2 and check["stop_token_ids"] == [2]
        assert check["parameters"] == 134_515_008
    names = sorted(p.name for p in exported.out.iterdir())
    assert not [n for n in names if n.endswith(".partial") or n.startswith(".gguf-src-")], names
    assert any("Model successfully exported" in line for line in exported.lines)
    assert any("converting to q4_K" in line or "q4_K" in line for line in exported.lines)
    manifest.verify(smol_model.path)  # the staged tokenizer fix never touched the model folder


@pytest.mark.parametrize("qtype", ["F16", *QUANTS])
def test_every_type_answers_a_chat_and_stops_on_eos(exported: Exported, qtype: str) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(exported.files[qtype].path), n_ctx=512, n_threads=1,
                          n_threads_batch=1, verbose=False)
    try:
        start = time.monotonic()
        out = llm.create_chat_completion(messages=QUESTION, temperature=0.0, max_tokens=32)
        TIMINGS[f"chat answer {qtype}"] = time.monotonic() - start
    finally:
        llm.close()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert "Paris" in choice["message"]["content"], choice
    assert "<|im_end|>" not in choice["message"]["content"]


def test_gguf_lm_tokenizes_scores_and_generates(exported: Exported, smol_tokenizer: Any) -> None:
    import numpy as np

    prompt = chat.render(smol_tokenizer, QUESTION, generation_prompt=True)
    with gguf.GgufLM(exported.files["Q8_0"].path, n_ctx=512, n_threads=1) as lm:
        ids = lm.tokenize(prompt)
        assert ids == smol_tokenizer(prompt, add_special_tokens=False)["input_ids"]  # no BOS added
        logits = lm.logits(ids)
        assert logits.shape == (len(ids), 49152) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        answer = lm.generate(ids, 32, stop_ids=[2])
        assert answer and len(answer) < 32 and 2 not in answer  # stopped on <|im_end|>, excluded
        assert answer[0] == int(np.argmax(logits[-1]))
        assert "Paris" in smol_tokenizer.decode(answer)
        assert lm.generate(ids, 3, stop_ids=[]) == answer[:3]
        assert np.array_equal(lm.logits(ids[:5]), logits[:5])  # reset between calls
        some = [0, 3, len(ids) - 1]  # only these rows computed: the same numbers
        assert np.allclose(lm.logits_at(ids, some), logits[some], atol=1e-4)
        with pytest.raises(ValidationError, match="ascend"):
            lm.logits_at(ids, [3, 0])


def test_the_engine_scores_in_its_own_context_reusing_the_prompt(exported: Exported,
                                                                 smol_tokenizer: Any) -> None:
    """After answering, the engine's context holds the prompt: scoring a reference that follows it
    evaluates only the reference, with the logits a fresh full pass gives (appliance eval)."""
    import numpy as np

    from appliance.runtime.engine import Artifact, Sampling
    from appliance.runtime.llama_engine import LlamaEngine

    path = exported.files["Q8_0"].path
    conversation = [*QUESTION, {"role": "assistant", "content": "The capital of France is Paris."}]
    ids = smol_tokenizer(chat.render(smol_tokenizer, conversation), add_special_tokens=False)["input_ids"]
    prompt = len(smol_tokenizer(chat.render(smol_tokenizer, QUESTION, generation_prompt=True),
                                add_special_tokens=False)["input_ids"])
    positions = list(range(prompt - 1, len(ids) - 1))
    with gguf.GgufLM(path, n_ctx=512, n_threads=1) as lm:
        fresh = lm.logits_at(ids, positions)
    engine = LlamaEngine(Artifact("q8", "gguf", path, "pass"), threads=1, context_length=512)
    try:
        list(engine.generate(QUESTION, Sampling(temperature=0, max_tokens=8, seed=0)))
        assert engine._reusable_prefix(ids) >= prompt - 1  # the prompt is still there
        assert np.allclose(engine.logits_at(ids, positions), fresh, atol=1e-3)
        assert engine._reusable_prefix(ids) == len(ids) - 1  # and now the reference too
    finally:
        engine.close()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_backend_sampling_gives_the_host_chains_tokens(exported: Exported, penalty: float,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path samples inside llama.cpp's graph (backend sampling); run here on the CPU
    backend: the same greedy tokens as the host chain, with a logit bias, with and without a repeat
    penalty; the chain stays attached for the next request with the same settings (attaching
    costs a graph reservation) and is replaced for other settings; the context scores again
    afterwards (scoring detaches it)."""
    import llama_cpp
    import numpy as np

    from appliance.runtime import llama_engine
    from appliance.runtime.engine import Artifact, Sampling

    attached: list[bool] = []
    real = llama_cpp.llama_set_sampler
    monkeypatch.setattr(llama_cpp, "llama_set_sampler",
                        lambda ctx, seq, chain: attached.append(chain is not None) or real(ctx, seq, chain))
    engine = llama_engine.LlamaEngine(Artifact("q8", "gguf", exported.files["Q8_0"].path, "pass"),
                                      threads=1, context_length=512)
    # seeded: the whole prompt is evaluated each time (a prompt partly from the cache gives logits
    # that differ in the last bits, which a penalty's near-ties can turn into another token)
    sampling = Sampling(temperature=0, max_tokens=24, repeat_penalty=penalty, logit_bias=((2, -100.0),),
                        seed=0)

    def tokens(s: Sampling) -> list[int]:
        return [d.token_id for d in engine.generate(QUESTION, s) if hasattr(d, "token_id")]

    try:
        host = tokens(sampling)
        assert attached == [] and len(host) == 24  # <|im_end|> biased away: all 24 tokens
        engine.backend_sampling = True
        assert tokens(sampling) == host and tokens(sampling) == host
        assert attached == [True]  # attached once for both requests
        assert tokens(Sampling(temperature=0, max_tokens=4, seed=0)) == host[:4] or penalty != 1.0
        assert attached == [True, False, True]  # other settings: detached, the new chain attached
        ids = engine.prompt_ids(QUESTION)
        assert np.isfinite(engine.logits_at(ids, [len(ids) - 1])).all()
        assert attached[-1] is False  # scoring took it off
    finally:
        engine.close()


def test_modelfile_renders_like_the_chat_template(exported: Exported, smol_tokenizer: Any) -> None:
    modelfile = exported.files["Q4_K_M"].modelfile
    assert modelfile is not None and modelfile.name == "smollm2-135m-instruct-Q4_K_M.Modelfile"
    commands = parse_modelfile(modelfile.read_text())
    found = dict(commands)
    assert (modelfile.parent / found["model"]).resolve() == exported.files["Q4_K_M"].path.resolve()
    assert [v for k, v in commands if k == "stop"] == ["<|im_end|>"]
    assert found["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert found["num_ctx"] == "4096"
    two_turns = [{"role": "user", "content": "Hi!"},
                 {"role": "assistant", "content": "Hello, how can I help?"},
                 {"role": "user", "content": "Name a colour."}]
    default = {"role": "system", "content": found["system"]}  # what Ollama sends when none is given
    for convo in (two_turns, [{"role": "system", "content": "Be brief."}, *two_turns]):
        sent = convo if convo[0]["role"] == "system" else [default, *convo]
        expected = chat.render(smol_tokenizer, convo, generation_prompt=True)
        assert ollama.render_ollama(found["template"], sent) == expected


def test_bad_quant_type_fails_before_any_work(smol_model: ArtifactRecord, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        export_gguf(smol_model.path, tmp_path / "out", ["Q4_K_M", "Q3_X"])
    assert "Q3_X" in str(info.value) and "Q4_K_M" in info.value.hint
    assert not (tmp_path / "out").exists()


# -- tiny Qwen2 against transformers ---------------------------------------------------------------
def test_tiny_qwen2_converts_and_matches_transformers(tiny_qwen2_source: Path, tiny_qwen2_gguf: Path,
                                                      qwen2_tokenizer: Any) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    check = gguf.check_gguf(tiny_qwen2_gguf, tiny_qwen2_source, tokenizer=qwen2_tokenizer)
    TIMINGS["check_gguf tiny qwen2"] = time.monotonic() - start
    assert check["architecture"] == "qwen2" and check["file_type"] == 0
    prompt = chat.render(qwen2_tokenizer, QUESTION, generation_prompt=True)
    ids = qwen2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_source), dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    with gguf.GgufLM(tiny_qwen2_gguf, n_ctx=256, n_threads=1) as lm:
        got = lm.logits(ids)
    scale = float(np.abs(expected).max())
    assert float(np.abs(got - expected).max()) < 1e-3 * scale + 1e-5


def test_imported_tokenizer_needs_the_staged_fix_and_a_llama_cpp_abort_is_contained(
        tiny_llama_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture tokenizer is the one our GGUF import writes (byte-level BPE + byte_fallback)."""
    from appliance.stages.models.importer import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama_source)
    fixed = gguf.convert(tiny_llama_source, tmp_path / "fixed.gguf")
    check = gguf.check_gguf(fixed, tiny_llama_source, tokenizer=tokenizer)
    assert (check["tokenizer"]["model"], check["tokenizer"]["pre"]) == ("gpt2", "smollm")
    monkeypatch.setattr(gguf, "normalized_tokenizer_json", lambda data: None)
    raw = gguf.convert(tiny_llama_source, tmp_path / "raw.gguf")
    assert gguf.read_metadata(raw)["tokenizer.ggml.model"] == "llama"  # mistaken for SentencePiece
    with pytest.raises(IntegrityError, match=r"llama\.cpp cannot load or run this file"):
        gguf.check_gguf(raw, tiny_llama_source, tokenizer=tokenizer)  # llama.cpp aborts: in a child


# -- failures an operator can meet -----------------------------------------------------------------
def _whitespace_bpe(folder: Path) -> None:
    """A tokenizer llama.cpp has never seen: BPE over a Whitespace pre-tokenizer, 300 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    text = ["the quick brown fox jumps over the lazy dog", "hello world, how are you?"] * 50
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))


def test_unknown_tokenizer_is_refused_clearly(tiny_llama: Path, tmp_path: Path) -> None:
    _whitespace_bpe(tiny_llama)
    out = tmp_path / "out" / "tiny.gguf"
    with pytest.raises(RefusedError) as info:
        gguf.convert(tiny_llama, out)
    err = info.value
    assert str(tiny_llama) in err.message and "does not recognise this model's tokenizer" in err.message
    assert "llama.cpp" in err.hint and err.title == "Tokenizer not supported by llama.cpp"
    assert "Traceback" not in str(err)
    assert list(out.parent.iterdir()) == []  # no partial file, no staging folder


def test_truncated_or_corrupt_gguf_is_detected(tiny_qwen2_source: Path, tiny_qwen2_gguf: Path,
                                               qwen2_tokenizer: Any, tmp_path: Path) -> None:
    data = tiny_qwen2_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"XXXX" + data[4:])
    for path in (truncated, corrupt):
        with pytest.raises(IntegrityError) as info:
            gguf.check_gguf(path, tiny_qwen2_source, tokenizer=qwen2_tokenizer)
        assert path.name in str(info.value)


def test_wrong_template_or_stop_tokens_are_named(tiny_qwen2_source: Path, tiny_qwen2_gguf: Path,
                                                qwen2_tokenizer: Any) -> None:
    spec = gguf.chat_spec(tiny_qwen2_source, qwen2_tokenizer)
    meta = gguf.read_metadata(tiny_qwen2_gguf)
    cases = [(dataclasses.replace(spec, template="{{ x }}"), r"field tokenizer\.chat_template"),
             (dataclasses.replace(spec, stop_token_ids=(1,)), r"field tokenizer\.ggml\.eos_token_id"),
             (dataclasses.replace(spec, stop_token_ids=(2, 5)), r"stop token id\(s\) \[5\] do not end")]
    for wrong, field in cases:
        with pytest.raises(IntegrityError, match=field):
            gguf.check_gguf(tiny_qwen2_gguf, tiny_qwen2_source, spec=wrong, tokenizer=qwen2_tokenizer,
                            meta=meta)


def test_failed_quantization_leaves_no_file(tiny_qwen2_gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_qwen2_gguf.read_bytes()[:4096])
    dst = tmp_path / "out-Q4_K_M.gguf"
    with pytest.raises(ApplianceError, match="could not quantize"):
        gguf.quantize(broken, dst, "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def test_converter_refuses_custom_code(tiny_llama: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    (tiny_llama / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(RefusedError, match="auto_map"):
        gguf.convert(tiny_llama, tmp_path / "x.gguf")
    shutil.rmtree(tiny_llama)
