"""The GPU memory estimate (`runtime.fit`) and where serve/chat put each model (`--gpu`/`--cpu`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ExitCode, ValidationError
from appliance.runtime import fit, gpu_wanted, service
from appliance.runtime.engine import Artifact

MIB = 1 << 20


def _gguf(path: Path, *, layers: int = 4, embd: int = 64, heads: int = 4, kv_heads: int = 2,
          ff: int = 256, vocab: int = 100, ctx: int = 512, tensor_floats: int = 1000) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(ctx)
    writer.add_block_count(layers)
    writer.add_embedding_length(embd)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_feed_forward_length(ff)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)])
    writer.add_tensor("w", np.zeros(tensor_floats, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_shape_comes_from_the_gguf_header(tmp_path: Path) -> None:
    shape = fit.gguf_shape(_gguf(tmp_path / "m.gguf"))
    assert shape == fit.Shape(layers=4, heads=4, kv_heads=2, key_width=16, value_width=16,
                              embedding=64, feed_forward=256, vocab=100)


def test_the_estimate_adds_weights_kv_cache_and_scratch(tmp_path: Path) -> None:
    path = _gguf(tmp_path / "m.gguf")
    f = fit.footprint("gguf", path, "m", 1024)
    assert f.weights == path.stat().st_size
    assert f.kv_cache == 4 * 1024 * 2 * (16 + 16) * 2  # layers x ctx x kv heads x (k + v) x f16
    batch = fit.UBATCH
    assert f.scratch == max(4 * 1024 * batch * 4, 100 * batch * 4) + batch * (2 * 256 + 4 * 64) * 4
    assert f.total == f.weights + f.kv_cache + f.scratch
    assert fit.footprint("gguf", path, "m", 2048).kv_cache == 2 * f.kv_cache  # linear in the context


def test_a_gguf_without_its_shape_is_named(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValidationError, match=r"bare\.gguf: no llama\.embedding_length in its metadata"):
        fit.gguf_shape(tmp_path / "bare.gguf")


def test_the_onnx_shape_comes_from_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152,
        "max_position_embeddings": 8192}))
    (tmp_path / "model.onnx").write_bytes(b"x" * 1000)
    (tmp_path / "model.onnx_data").write_bytes(b"x" * 5000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 9999)  # not on the device
    f = fit.footprint("onnx", tmp_path, "o", 100)
    assert f.weights == 6000
    assert f.kv_cache == 30 * 100 * 3 * (64 + 64) * 4  # an unknown cache type is counted as fp32
    assert fit.default_context("onnx", tmp_path) == 8192
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValidationError, match="hidden_size is missing"):
        fit.onnx_shape(tmp_path)


def test_the_onnx_cache_is_counted_in_the_type_the_export_keeps(tmp_path: Path) -> None:
    """optimum's fp32/int8/int4 graphs keep an fp32 cache (4 bytes an element), fp16 and genai's
    graphs an fp16 one: what the export recorded beside the folder, else genai's config, else 4."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100}))
    per_element = 2 * 32 * 2 * (16 + 16)  # layers x context x kv heads x (key + value width)
    assert fit.footprint("onnx", folder, "o", 32).kv_cache == per_element * 4
    (folder / "genai_config.json").write_text("{}")
    assert fit.footprint("onnx", folder, "o", 32).kv_cache == per_element * 2
    for recorded, size in (("FLOAT", 4), ("FLOAT16", 2)):
        (tmp_path / "onnx_export.json").write_text(json.dumps({"kv_dtype": recorded}))
        assert fit.footprint("onnx", folder, "o", 32).kv_cache == per_element * size


def test_a_genai_built_onnx_folder_takes_a_capped_context_unasked(tmp_path: Path) -> None:
    """genai allocates its KV buffer for the whole context on CUDA: like a GGUF, a long-context model
    opens at DEFAULT_MAX_CONTEXT unless asked; optimum's graph grows its cache and keeps the trained."""
    from appliance.runtime.engine import DEFAULT_MAX_CONTEXT

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    assert fit.default_context("onnx", tmp_path) == 131072
    (tmp_path / "genai_config.json").write_text("{}")
    assert fit.default_context("onnx", tmp_path) == DEFAULT_MAX_CONTEXT == 8192
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert fit.default_context("onnx", tmp_path) == 2048


def _print(name: str, mib: int) -> fit.Footprint:
    return fit.Footprint(name, 100, mib * MIB, 0, 0)


def test_models_are_placed_in_order_while_they_fit() -> None:
    card = fit.CUDA_OVERHEAD + 1000 * MIB
    placed = fit.place([_print("a", 600), _print("b", 600), _print("c", 300)], card)
    assert placed.on_gpu == ("a", "c") and placed.on_cpu == ("b",) and not placed.fits
    assert placed.needed == fit.CUDA_OVERHEAD + 900 * MIB
    assert fit.place([_print("a", 1000)], card).fits


def test_the_report_says_what_does_not_fit() -> None:
    card = fit.Card("a 1 GiB card", 1 << 30, 1 << 30)
    placed, lines = fit.report([_print("big", 900)], card)
    assert not placed.fits
    assert lines[0].startswith("big: 900 MiB at 100 tokens (weights 900, KV cache 0, scratch 0)")
    assert lines[-1].startswith("does not fit a 1 GiB card: 1,540 MiB needed, 1,024 MiB usable")
    assert "left for the CPU: big" in lines[-1]


def test_the_card_is_the_size_asked_or_a_t4_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import gpus

    assert fit.this_card(8).free_bytes == 8 << 30
    with pytest.raises(ValidationError, match="card size is -1"):
        fit.this_card(-1)
    monkeypatch.setattr(gpus, "read_gpus", lambda: ([], "no nvidia-smi"))
    assert fit.this_card(None).label == "a 16 GiB T4-class card (no GPU here)"
    monkeypatch.setattr(gpus, "read_gpus", lambda: (
        [gpus.GpuStatus(0, "Tesla T4", 1024.0, 15360.0, 0.0, "7.5")], ""))
    card = fit.this_card(None)
    assert card.label.startswith("GPU 0 (Tesla T4, 15.0 GiB, 14.0 GiB free)")
    assert card.free_bytes == int(14336 * MIB * fit.MARGIN)


# -- where serve puts the models ----------------------------------------------------------------
def test_device_choices() -> None:
    assert [gpu_wanted(d) for d in ("auto", "gpu", "cpu")] == [None, True, False]
    with pytest.raises(ValidationError, match="device 'tpu' is not one of auto, gpu, cpu"):
        service.ServeOptions(("a",), device="tpu").validated()
    assert service.ServeOptions.from_params({"artifacts": ["a"]}).device == "auto"  # an older job row


def _artifacts(tmp_path: Path, n: int) -> list[Artifact]:
    return [Artifact(f"m{i}", "gguf", _gguf(tmp_path / f"m{i}.gguf", tensor_floats=250_000), "pass")
            for i in range(n)]


@pytest.fixture
def gpu_here(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import engines

    monkeypatch.setattr(engines, "has_gpu_runtime", lambda kind: True)


def test_auto_puts_what_does_not_fit_on_the_cpu(tmp_path: Path, gpu_here: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    arts = _artifacts(tmp_path, 3)
    one = fit.footprint("gguf", arts[0].path, "m0", 512).total
    card = fit.Card("test card", 0, fit.CUDA_OVERHEAD + 2 * one + one // 2)
    monkeypatch.setattr(fit, "this_card", lambda _: card)
    said: list[str] = []
    places = service.placement(arts, service.ServeOptions(("m0", "m1", "m2"), context=512), said.append)
    assert places == {"m0": None, "m1": None, "m2": False}
    assert said[0].startswith("m2 goes on the CPU: it does not fit the GPU's free memory")
    with pytest.raises(ValidationError, match="the models do not fit the GPU's free memory") as err:
        service.placement(arts, service.ServeOptions(("m0",), context=512, device="gpu"), said.append)
    assert "m2" in err.value.message and "--cpu" in (err.value.hint or "")
    assert service.placement(arts, service.ServeOptions(("m0",), device="cpu"), said.append) == \
        {"m0": False, "m1": False, "m2": False}


def test_a_model_without_its_shape_is_placed_without_a_check(tmp_path: Path, gpu_here: None) -> None:
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    said: list[str] = []
    arts = [Artifact("bare", "onnx", tmp_path / "bare", "pass")]
    assert service.placement(arts, service.ServeOptions(("bare",)), said.append) == {"bare": None}
    assert said[0].startswith("bare: its GPU memory cannot be estimated (")


def test_without_a_gpu_runtime_the_engines_decide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import engines

    monkeypatch.setattr(engines, "has_gpu_runtime", lambda kind: False)
    arts = _artifacts(tmp_path, 1)
    assert service.placement(arts, service.ServeOptions(("m0",)), print) == {"m0": None}
    # --gpu is passed on: the engine refuses with its own message (no GPU offload in this build)
    assert service.placement(arts, service.ServeOptions(("m0",), device="gpu"), print) == {"m0": True}


def test_exports_fit_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    path = _gguf(tmp_path / "m.gguf")
    assert main(["--home", str(tmp_path / "ws"), "exports", "fit", str(path), "--card-gib", "16",
                 "--context", "256"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "m: " in out and "at 256 tokens" in out and "fits a 16 GiB card" in out
    assert main(["--home", str(tmp_path / "ws"), "exports", "fit", str(path), "--card-gib", "0.1",
                 "--json"]) == ExitCode.FAILED
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and data["on_cpu"] == ["m"] and data["models"][0]["context"] == 512
