"""ONNX export and the onnxruntime runner, against transformers on the same folders.

Tiny random Llama and Qwen2 folders check the graphs numerically (logits, KV cache, quantization,
fp16, external data, failures); the real SmolLM2 checks the chat path end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance import manifest
from appliance.errors import ApplianceError, RefusedError, ValidationError
from appliance.workspace import ArtifactRecord
from export.onnx import TITLE, OnnxLM, export_onnx, quantize_onnx
from tests.conftest import TINY_SHAPE
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# A rendered ChatML conversation in SmolLM2 ids (system "Be brief.", user "Hi", assistant prompt).
IDS = [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
SIDE_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json", "config.json"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# With SmolLM2's default system prompt the first answer token is a near tie ("The" 25.33 vs "L" 25.24
# in fp32), so a quantized export may answer in French (docs/PITFALLS.md); a plain system prompt
# makes the question a fair test of a 4-bit export.
SHORT = [{"role": "system", "content": "Answer in one short sentence."}, *QUESTION]


@pytest.fixture(scope="module")
def tiny(module_tmp: ModuleTemp, tiny_llama_source: Path,
         tiny_qwen2_source: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """name -> (folder, info): fp32 of both families, int4/int8 quantized from them, fp16 and a
    direct int4 export of the Llama."""
    root = module_tmp.mktemp("onnx")
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for family, src in (("llama", tiny_llama_source), ("qwen2", tiny_qwen2_source)):
        fp32 = root / f"{family}-fp32"
        out[f"{family}-fp32"] = fp32, export_onnx(src, fp32, "fp32")
        for precision in ("int4", "int8"):
            folder = root / f"{family}-{precision}"
            out[folder.name] = folder, quantize_onnx(fp32, folder, precision)
    for name, precision in (("llama-fp16", "fp16"), ("llama-int4-direct", "int4")):
        out[name] = root / name, export_onnx(tiny_llama_source, root / name, precision)
    return out


def _hf_logits(source: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _greedy_without_cache(lm: OnnxLM, ids: list[int], steps: int) -> list[int]:
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(np.argmax(lm.logits(seq)[-1])))
    return seq[len(ids):]


# -- tiny models: numerics ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp32_matches_transformers_and_the_cache_matches_recompute(
        family: str, tiny: dict, request: pytest.FixtureRequest) -> None:
    folder, info = tiny[f"{family}-fp32"]
    lm = OnnxLM(folder, threads=2)
    generated = lm.generate(IDS, 10, stop_ids=[])
    assert generated == _greedy_without_cache(lm, IDS, 10)
    full = lm.logits(IDS + generated)
    source = request.getfixturevalue(f"tiny_{family}_source")
    assert np.abs(full - _hf_logits(source, IDS + generated)).max() < 1e-4
    # every cached step gives the logits a full recompute gives at that position
    last, cache = lm.prefill(IDS, chunk=5)
    steps = [last]
    for token in generated[:-1]:
        logits, cache = lm.decode(token, cache)
        steps.append(logits)
    assert np.abs(np.stack(steps) - full[len(IDS) - 1:-1]).max() < 1e-4
    assert cache.length == len(IDS) + len(generated) - 1
    assert info["precision"] == "fp32" and info["kv_dtype"] == "FLOAT" and info["num_layers"] == 2
    assert info["inputs"] == ["attention_mask", "input_ids", "position_ids"]


def test_layout_is_self_contained(tiny: dict, tiny_llama_source: Path) -> None:
    folder, info = tiny["llama-fp32"]
    names = {p.name for p in folder.iterdir()}
    assert names == SIDE_FILES | {"model.onnx"}  # no optimum leftovers, no external data when small
    assert info["files"] == {n: (folder / n).stat().st_size for n in names}
    assert info["size_bytes"] == sum(info["files"].values()) and info["external_data"] is False
    assert info["opset"]["ai.onnx"] >= 14
    assert (folder / "tokenizer.json").read_bytes() == (tiny_llama_source / "tokenizer.json").read_bytes()
    assert not list(folder.parent.glob(".*.partial"))


@pytest.mark.parametrize("name, bound", [("llama-int4", 0.3), ("qwen2-int4", 0.3), ("llama-int4-direct", 0.3),
                                         ("llama-int8", 0.05), ("qwen2-int8", 0.05)])
def test_quantized_exports_run_and_stay_close(name: str, bound: float, tiny: dict) -> None:
    import onnx

    folder, info = tiny[name]
    family, precision = name.split("-")[:2]
    reference = OnnxLM(tiny[f"{family}-fp32"][0]).logits(IDS)
    logits = OnnxLM(folder).logits(IDS)
    assert np.abs(logits - reference).max() < bound
    quant = info["quantization"]
    assert quant["method"] == "MatMulNBits" and quant["bits"] == int(precision[3:])
    assert quant["lm_head_untied"] is True and quant["head_bits"] == 8  # the tied head is quantized too
    graph = onnx.load(str(folder / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMulNBits" in ops
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in
                {t.name for t in graph.initializer}]  # no float weight matrix left


def test_int4_keeps_at_8_bits_the_matmuls_a_layout_names(tiny: dict, tmp_path: Path) -> None:
    """`keep_8bit` (the export stage's measured layout) against the fixed list, on the same graph:
    exactly the named MatMuls at 8 bits, the rest at 4; a name the graph lacks is refused."""
    import onnx

    from export.onnx import weight_units

    fp32 = tiny["llama-fp32"][0]
    units = weight_units(fp32)
    assert [u.module for u in units][:2] == ["model.layers.0.self_attn.q_proj",
                                             "model.layers.0.self_attn.k_proj"]
    assert units[-1].module == "lm_head" and (units[-1].k, units[-1].n) == (64, 49152)
    assert [u.head for u in units] == [False] * (len(units) - 1) + [True]  # the tied head, untied
    keep = ["/lm_head/MatMul", "/model/layers.1/mlp/up_proj/MatMul"]
    info = quantize_onnx(fp32, tmp_path / "int4", "int4", keep_8bit=keep)["quantization"]
    assert (info["layout"], info["eight_bit"], info["weight_matmuls"]) == ("measured", 2, len(units))
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx")).graph
    bits = {n.name.rsplit("_Q", 1)[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}
    assert set(bits) == {u.name for u in units}
    assert {n for n, b in bits.items() if b == 8} == set(keep)
    assert tiny["llama-int4"][1]["quantization"]["layout"] == "fixed"
    with pytest.raises(ApplianceError, match="does not have"):
        quantize_onnx(fp32, tmp_path / "bad", "int4", keep_8bit=["/model/layers.9/mlp/up_proj/MatMul"])
    assert not (tmp_path / "bad").exists()


def test_int4_direct_export_equals_quantizing_the_fp32_export(tiny: dict) -> None:
    direct, _ = tiny["llama-int4-direct"]
    derived, _ = tiny["llama-int4"]
    assert np.array_equal(OnnxLM(direct).logits(IDS), OnnxLM(derived).logits(IDS))


def test_fp16_graph_holds_fp16_weights_and_runs_on_cpu(tiny: dict) -> None:
    import onnx

    folder, info = tiny["llama-fp16"]
    graph = onnx.load(str(folder / "model.onnx")).graph
    by_type: dict[int, int] = {}
    for tensor in graph.initializer:
        by_type[tensor.data_type] = by_type.get(tensor.data_type, 0) + len(tensor.raw_data)
    assert by_type[onnx.TensorProto.FLOAT16] > 0.99 * sum(by_type.values())
    assert info["kv_dtype"] == "FLOAT16"
    lm = OnnxLM(folder, threads=2)  # CPU provider: onnxruntime runs fp16 graphs there too
    assert lm.past_dtype == np.float16
    reference = OnnxLM(tiny["llama-fp32"][0]).logits(IDS)
    assert np.abs(lm.logits(IDS) - reference).max() < 5e-3
    assert lm.generate(IDS, 4, []) == _greedy_without_cache(lm, IDS, 4)


def test_fp16_is_genai_s_builder_graph_with_the_model_s_own_files(tiny: dict,
                                                                 tiny_llama_source: Path) -> None:
    import onnx

    folder, info = tiny["llama-fp16"]
    assert info["graph"] == "onnxruntime-genai builder" and tiny["llama-fp32"][1]["graph"] == "optimum"
    assert set(info["files"]) == SIDE_FILES | {"model.onnx", "model.onnx.data", "genai_config.json"}
    for name in SIDE_FILES:  # the merged model's files, not the builder's re-saved ones
        assert (folder / name).read_bytes() == (tiny_llama_source / name).read_bytes(), name
    nodes = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
    optimum = onnx.load(str(tiny["llama-fp32"][0] / "model.onnx"), load_external_data=False).graph.node
    assert "GroupQueryAttention" in {n.op_type for n in nodes}
    assert len(nodes) * 5 < len(optimum)  # the host-side shape arithmetic is gone
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # its cache went with the staging


def test_fp16_falls_back_to_optimum_for_an_architecture_the_builder_does_not_know(
        tmp_path: Path, tiny_llama_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setattr("export.onnx._run_builder", lambda cmd, say: (
        1, ["NotImplementedError: The FooForCausalLM model is not currently supported."]))
    info = export_onnx(tiny_llama_source, tmp_path / "fp16", "fp16", progress=said.append)
    assert info["graph"] == "optimum" and info["kv_dtype"] == "FLOAT16"
    assert any("does not know this architecture" in line for line in said)
    monkeypatch.setattr("export.onnx._run_builder", lambda cmd, say: (1, ["Killed"]))
    with pytest.raises(ApplianceError, match=r"model builder failed .*exit 1.*Killed"):
        export_onnx(tiny_llama_source, tmp_path / "fp16-b", "fp16")
    assert not (tmp_path / "fp16-b").exists() and not list(tmp_path.glob(".fp16-b*"))


def _bits(folder: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {n.name.rsplit("_Q", 1)[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}


def test_int4_cuda_is_genai_s_graph_in_int4_with_the_layout_s_modules_at_8_bits(
        tiny: dict, tiny_llama_source: Path, tmp_path: Path) -> None:
    """The CUDA int4: genai's fp16 graph (GroupQueryAttention, fp16 cache) with q/k/v separate, so
    a measured layout's modules map one to one onto its MatMuls; it runs on the CPU (the gate's
    scoring) close to the fp32 export, with the same greedy tokens as without a cache."""
    import onnx

    keep = ["lm_head", "model.layers.1.self_attn.k_proj"]
    folder = tmp_path / "int4-cuda"
    info = export_onnx(tiny_llama_source, folder, "int4-cuda", keep_8bit_modules=keep)
    assert info["graph"] == "onnxruntime-genai builder" and info["kv_dtype"] == "FLOAT16"
    assert "genai_config.json" in info["files"] and "GroupQueryAttention" in {
        n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}
    quant = info["quantization"]
    assert (quant["layout"], quant["eight_bit"], quant["activations"]) == ("measured", 2, "fp16")
    bits = _bits(folder)
    assert not [n for n in bits if "qkv" in n] and len(bits) == 7 * TINY_SHAPE["num_hidden_layers"] + 1
    assert {n for n, b in bits.items() if b == 8} == {"/lm_head/MatMul", "/model/layers.1/attn/k_proj/MatMul"}
    assert sorted(quant["eight_bit_matmuls"]) == ["/lm_head/MatMul", "/model/layers.1/attn/k_proj/MatMul"]
    assert set(bits.values()) == {4, 8}
    lm = OnnxLM(folder)
    reference = OnnxLM(tiny["llama-fp32"][0]).logits(IDS)
    assert np.abs(lm.logits(IDS).astype(np.float32) - reference).max() < 0.3
    assert lm.generate(IDS, 4, []) == _greedy_without_cache(lm, IDS, 4)
    fixed = export_onnx(tiny_llama_source, tmp_path / "fixed", "int4-cuda")
    assert fixed["quantization"]["layout"] == "fixed"
    assert {n.split("/")[-2] for n, b in _bits(tmp_path / "fixed").items() if b == 8} == {
        "v_proj", "down_proj", "lm_head"}


def test_int4_cuda_maps_packed_modules_and_falls_back_for_a_layout_it_cannot_map(
        tiny_llama_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed HF module (Phi-3's qkv_proj) keeps each of genai's parts at 8 bits; a layout naming a
    module the graph lacks is not half applied: the fixed layout, with a line saying why; an
    architecture genai's builder does not know is refused, leaving nothing behind."""
    from export.onnx import genai_nodes

    names = ["/model/layers.0/attn/q_proj/MatMul", "/model/layers.0/attn/k_proj/MatMul",
             "/model/layers.0/attn/v_proj/MatMul", "/model/layers.0/attn/o_proj/MatMul", "/lm_head/MatMul"]
    assert genai_nodes(names, ["model.layers.0.self_attn.qkv_proj", "lm_head"]) == (
        [names[0], names[1], names[2], names[4]], [])
    assert genai_nodes(names, ["model.layers.0.self_attn.dense", "model.layers.3.mlp.up_proj"]) == (
        [names[3]], ["model.layers.3.mlp.up_proj"])
    said: list[str] = []
    info = export_onnx(tiny_llama_source, tmp_path / "a", "int4-cuda", progress=said.append,
                       keep_8bit_modules=["model.layers.9.mlp.up_proj"])
    assert info["quantization"]["layout"] == "fixed"
    assert any("no MatMul for (e.g. model.layers.9.mlp.up_proj): the fixed layout" in line for line in said)
    with pytest.raises(ValidationError, match="for int4: it is for int4-cuda"):
        export_onnx(tiny_llama_source, tmp_path / "c", "int4", keep_8bit_modules=["lm_head"])
    monkeypatch.setattr("export.onnx._run_builder", lambda cmd, say: (
        1, ["NotImplementedError: The FooForCausalLM model is not currently supported."]))
    with pytest.raises(RefusedError, match="int4-cuda is built on onnxruntime-genai's fp16 graph"):
        export_onnx(tiny_llama_source, tmp_path / "b", "int4-cuda")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing else left, staging included


def test_external_data_is_one_file_beside_the_graph(tmp_path: Path, tiny_llama_source: Path,
                                                   tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")  # optimum's switch: as for a >2 GB model
    fp32 = tmp_path / "fp32"
    fp32.mkdir()  # an empty target (a workspace writer's staging directory) is fine
    info = export_onnx(tiny_llama_source, fp32, "fp32")
    assert info["external_data"] is True
    assert set(info["files"]) == SIDE_FILES | {"model.onnx", "model.onnx_data"}
    assert np.abs(OnnxLM(fp32).logits(IDS) - OnnxLM(tiny["llama-fp32"][0]).logits(IDS)).max() < 1e-6
    monkeypatch.setattr("export.onnx.EXTERNAL_DATA_THRESHOLD", 0)
    info = quantize_onnx(fp32, tmp_path / "int4", "int4")
    assert info["files"]["model.onnx"] < 0.1 * info["files"]["model.onnx_data"]
    assert np.array_equal(OnnxLM(tmp_path / "int4").logits(IDS), OnnxLM(tiny["llama-int4"][0]).logits(IDS))


# -- runner --------------------------------------------------------------------------------------
def test_runner_needs_no_torch_transformers_or_optimum(tiny: dict) -> None:
    code = ("import json, sys\nfrom pathlib import Path\nfrom export.onnx import OnnxLM\n"
            f"lm = OnnxLM(Path({str(tiny['llama-int4'][0])!r}), threads=1)\n"
            "out = lm.generate(lm.tokenize('<|im_start|>user\\nHi<|im_end|>\\n'), 3, lm.stop_ids)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    loaded = set(json.loads(run.stdout.splitlines()[-1]))
    assert "onnxruntime" in loaded and "tokenizers" in loaded
    assert not loaded & {"torch", "transformers", "optimum", "onnx"}, sorted(loaded)


def test_runner_basics(tiny: dict) -> None:
    lm = OnnxLM(tiny["qwen2-fp32"][0])
    assert lm.stop_ids == [2]
    assert lm.tokenize("<|im_start|>user\nHi") == [1, 4093, 198, 26843]
    assert lm.detokenize([1, 4093, 198, 26843]) == "user\nHi"
    assert lm.generate(IDS, 0, []) == []
    first = lm.generate(IDS, 1, [])
    assert lm.generate(IDS, 5, stop_ids=first) == []  # the stop token is not returned
    with pytest.raises(ApplianceError, match="no token ids"):
        lm.logits([])


@pytest.mark.parametrize("name", ["llama-fp32", "llama-fp16", "llama-int4-direct", "qwen2-int8"])
def test_io_binding_gives_the_plain_feed_s_logits(name: str, tiny: dict) -> None:
    """The IO-binding step (the cache left where the provider computes: CUDA's memory on a GPU)
    run on the CPU provider: the same logits and greedy tokens as the plain feed, and a cache cut
    back (an edited conversation) goes on from the right place."""
    plain, bound = OnnxLM(tiny[name][0]), OnnxLM(tiny[name][0], bind=True)
    assert not plain.bind and bound.bind and bound.device == "cpu"
    assert plain.generate(IDS, 12, []) == bound.generate(IDS, 12, [])
    logits, cache = bound.prefill(IDS, chunk=3)
    np.testing.assert_array_equal(logits, plain.prefill(IDS, chunk=3)[0])
    assert not any(isinstance(v, np.ndarray) for v in cache.tensors.values())  # OrtValues
    cut = cache.cut(4)
    assert cut.length == 4 and all(v.shape[2] == 4 for v in cut.tensors.values())
    np.testing.assert_array_equal(bound.forward(IDS[4:], cut)[0], plain.logits(IDS)[4:])


def test_a_missing_execution_provider_is_reported(tiny: dict) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(ApplianceError, match="CUDAExecutionProvider") as err:
        OnnxLM(tiny["llama-fp32"][0], providers=["CUDAExecutionProvider"])
    assert "CPUExecutionProvider" in (err.value.hint or "")


# -- failures ------------------------------------------------------------------------------------
def test_export_under_a_file_fails_cleanly(tmp_path: Path, tiny_llama_source: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ApplianceError) as err:
        export_onnx(tiny_llama_source, blocker / "out", "fp32")
    assert err.value.title == TITLE and str(blocker) in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-dir"] and blocker.read_text() == "x"


def test_a_failure_midway_leaves_nothing_behind(tmp_path: Path, tiny_llama: Path) -> None:
    (tiny_llama / "model.safetensors").write_bytes(b"\x00" * 64)  # passes the file checks, not loading
    with pytest.raises(ApplianceError) as err:
        export_onnx(tiny_llama, tmp_path / "out", "int4")
    assert err.value.title == TITLE and "tiny-llama" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


# -- the real SmolLM2 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_onnx(module_tmp: ModuleTemp, smol_model: ArtifactRecord) -> Path:
    """SmolLM2 exported once in fp32, and quantized from that to int4."""
    root = module_tmp.mktemp("smol-onnx")
    fp32 = export_onnx(smol_model.path, root / "fp32", "fp32")
    int4 = quantize_onnx(root / "fp32", root / "int4", "int4")
    assert int4["size_bytes"] < 0.45 * fp32["size_bytes"]
    return root


def test_smollm2_int4_answers_and_stops_on_eos(smol_onnx: Path, smol_model: ArtifactRecord,
                                               smol_tokenizer) -> None:
    info = manifest.read(smol_model.path)["info"]
    text = smol_tokenizer.apply_chat_template(SHORT, add_generation_prompt=True, tokenize=False)
    lm = OnnxLM(smol_onnx / "int4", threads=2)
    ids = lm.tokenize(text)
    assert ids == smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = lm.generate(ids, 48, info["stop_token_ids"])
    assert "Paris" in lm.detokenize(answer)
    assert len(answer) < 48  # it stopped on its own: the next greedy token is <|im_end|>
    assert lm.generate(ids, len(answer) + 1, [])[-1] in info["stop_token_ids"]
    assert lm.stop_ids == info["stop_token_ids"] == [2] and info["stop_tokens"] == ["<|im_end|>"]


def test_smollm2_fp32_matches_transformers(smol_onnx: Path, smol_model: ArtifactRecord,
                                           smol_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = smol_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    lm = OnnxLM(smol_onnx / "fp32", threads=2)
    answer = lm.generate(ids, 12, [2])
    assert lm.detokenize(answer) == "The capital of France is Paris."
    assert answer == _greedy_without_cache(lm, ids, len(answer))
    model = AutoModelForCausalLM.from_pretrained(str(smol_model.path), dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids + answer])).logits[0].numpy()
    assert np.abs(lm.logits(ids + answer) - hf).max() < 1e-3
