"""Model import on real files: the embedded SmolLM2 GGUF, HF folders, and every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import manifest, models
from appliance.errors import RefusedError, ValidationError
from appliance.workspace import ArtifactRecord, Workspace

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


# -- the embedded default (GGUF source) ------------------------------------------------------
def test_default_model_is_recorded_faithfully(smol_model: ArtifactRecord) -> None:
    data = manifest.verify(smol_model.path)  # every sha256 recomputed
    info = data["info"]
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008
    assert info["context_length"] == 8192 and info["vocab_size"] == 49152
    assert info["eos_token"] == "<|im_end|>" and info["stop_token_ids"] == [2]
    assert info["bos_token"] == "<|im_start|>"
    assert info["tokenizer_parity"]["checked"] is True
    assert data["config"]["source"]["type"] == "default"
    assert "gguf/SmolLM2-135M-Instruct.Q4_1.gguf" in data["files"]
    assert "model.safetensors" in data["files"] and "tokenizer.model" not in data["files"]
    assert not any(name.endswith((".bin", ".pt")) for name in data["files"])


def test_dequantized_default_model_answers_like_the_gguf(smol_model: ArtifactRecord,
                                                         smol_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smol_model.path), dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smol_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             return_tensors="pt")
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = smol_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_tokenizer_does_not_add_a_bos_llama_cpp_would_not(smol_tokenizer) -> None:
    assert smol_tokenizer("Hello world")["input_ids"] == [19556, 905]


# -- HF folders -------------------------------------------------------------------------------
def test_hf_folder_import(model_workspace: tuple[Workspace, ArtifactRecord], tiny_llama: Path) -> None:
    ws, _ = model_workspace
    (tiny_llama / "README.md").write_text("tiny")
    (tiny_llama / "training_args.bin").write_bytes(b"\x80\x04pickle")  # beside safetensors: skipped
    record = models.import_path(ws, tiny_llama, name="tiny")
    data = manifest.verify(record.path)
    assert record.summary["architecture"] == "LlamaForCausalLM"
    assert record.summary["context_length"] == 1024
    assert data["info"]["parameters"] == _param_count(tiny_llama)
    assert "training_args.bin" in data["info"]["skipped_files"]
    assert "training_args.bin" not in data["files"] and "README.md" in data["files"]


def _param_count(folder: Path) -> int:
    """Independent count: torch's own numel over the loaded tensors."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(folder / "model.safetensors")).values())


def test_sharded_folder_imports(workspace: Workspace, tiny_llama: Path) -> None:
    shards = [p.name for p in _shard(tiny_llama)]
    assert len(shards) > 1
    record = models.import_path(workspace, tiny_llama)
    assert set(shards) <= set(manifest.read(record.path)["files"])


def _shard(folder: Path) -> list[Path]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    model.save_pretrained(str(folder), max_shard_size="2MB")
    return sorted(folder.glob("*.safetensors"))


def test_missing_shard_is_refused(workspace: Workspace, tiny_llama: Path) -> None:
    shards = _shard(tiny_llama)
    shards[-1].unlink()
    with pytest.raises(ValidationError, match=rf"missing shard.*{shards[-1].name}"):
        models.import_path(workspace, tiny_llama)


def test_mismatched_shard_is_refused(workspace: Workspace, tiny_llama: Path) -> None:
    shards = _shard(tiny_llama)
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name + ".renamed"] = index["weight_map"].pop(name)
    (tiny_llama / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValidationError, match=r"does not match model\.safetensors\.index\.json"):
        models.import_path(workspace, tiny_llama)
    assert shards


def test_truncated_weights_are_refused(workspace: Workspace, tiny_llama: Path) -> None:
    weights = tiny_llama / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(ValidationError, match="truncated"):
        models.import_path(workspace, tiny_llama)


def test_pickle_only_folder_is_refused_without_loading(workspace: Workspace, tiny_llama: Path) -> None:
    (tiny_llama / "model.safetensors").unlink()
    (tiny_llama / "pytorch_model.bin").write_bytes(b"not even a real pickle")
    with pytest.raises(RefusedError, match=r"pickle weights.*pytorch_model\.bin"):
        models.import_path(workspace, tiny_llama)
    assert workspace.list("model") == []


def test_pickle_file_path_is_refused(workspace: Workspace, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(RefusedError, match="never unpickles"):
        models.import_path(workspace, path)


def test_custom_code_is_refused(workspace: Workspace, tiny_llama: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tiny_llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(RefusedError, match="custom code"):
        models.import_path(workspace, tiny_llama)


def test_unsupported_architecture_names_the_supported_ones(workspace: Workspace, tiny_llama: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tiny_llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(RefusedError) as err:
        models.import_path(workspace, tiny_llama)
    assert "GPT2LMHeadModel" in str(err.value) and "Qwen2ForCausalLM" in str(err.value)


def test_missing_chat_template_is_refused_unless_supplied(workspace: Workspace, tiny_llama: Path,
                                                          tmp_path: Path) -> None:
    template = (tiny_llama / "chat_template.jinja").read_text()
    (tiny_llama / "chat_template.jinja").unlink()
    with pytest.raises(RefusedError, match="no chat template"):
        models.import_path(workspace, tiny_llama)
    supplied = tmp_path / "chatml.jinja"
    supplied.write_text(template)
    record = models.import_path(workspace, tiny_llama, chat_template_file=supplied)
    assert (record.path / "chat_template.jinja").read_text() == template
    assert models.load_tokenizer(record.path).chat_template == template


def test_template_without_stop_token_is_refused(workspace: Workspace, tiny_llama: Path,
                                                tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValidationError, match="stop token"):
        models.import_path(workspace, tiny_llama, chat_template_file=bad)


def _write_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_unsupported_architecture_is_refused(workspace: Workspace, tmp_path: Path) -> None:
    with pytest.raises(RefusedError, match=r"(?s)'bert' is not supported.*llama"):
        models.import_path(workspace, _write_gguf(tmp_path / "x.gguf", "bert"))


def test_gguf_without_chat_template_is_refused(workspace: Workspace, tmp_path: Path) -> None:
    with pytest.raises(RefusedError, match="no chat template"):
        models.import_path(workspace, _write_gguf(tmp_path / "x.gguf", "llama"))


def test_not_a_gguf_file(workspace: Workspace, tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF but not really")
    with pytest.raises(ValidationError, match="not a readable GGUF"):
        models.import_path(workspace, path)


# -- CLI ---------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_cli_models_lifecycle(tmp_path: Path, tiny_llama: Path) -> None:
    home = str(tmp_path / "home")
    out = _cli("--home", home, "models", "import", str(tiny_llama), "--name", "tiny")
    assert out.returncode == 0, out.stderr
    assert "imported model 'tiny'" in out.stdout
    listing = _cli("--home", home, "models", "list")
    assert "tiny" in listing.stdout and "LlamaForCausalLM" in listing.stdout
    show = _cli("--home", home, "models", "show", "tiny", "--verify")
    assert show.returncode == 0 and "sha256 verified" in show.stdout
    again = _cli("--home", home, "models", "import", str(tiny_llama), "--name", "tiny")
    assert again.returncode == 2 and "Already exists" in again.stderr
    refused = _cli("--home", home, "models", "rm", "tiny")  # no tty, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert _cli("--home", home, "models", "rm", "tiny", "--yes").returncode == 0
    missing = _cli("--home", home, "models", "show", "tiny")
    assert missing.returncode == 2 and "no model named 'tiny'" in missing.stderr


def test_cli_reports_a_changed_byte(tmp_path: Path, tiny_llama: Path) -> None:
    home = tmp_path / "home"
    assert _cli("--home", str(home), "models", "import", str(tiny_llama), "--name", "t").returncode == 0
    config = home / "models" / "t" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"llamb"'))
    out = _cli("--home", str(home), "models", "show", "t", "--verify")
    assert out.returncode == 2 and "content changed (sha256 mismatch): config.json" in out.stderr


def test_cli_imports_a_gguf_file_by_path(tmp_path: Path) -> None:
    from appliance import stack

    home = tmp_path / "home"
    out = _cli("--home", str(home), "models", "import", str(stack.default_model_path()), "--name", "g")
    assert out.returncode == 0, out.stderr
    data = manifest.verify(home / "models" / "g")
    assert data["config"]["source"]["type"] == "gguf"
    assert data["config"]["source"]["sha256"] == stack.DEFAULT_MODEL_SHA256
    assert data["info"]["tokenizer_parity"]["checked"] is True
    assert (home / "models" / "g" / "gguf" / stack.DEFAULT_MODEL_FILE).is_file()
