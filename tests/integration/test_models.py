"""Model import on real files: the embedded SmolLM2 GGUF, HF folders, and every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import manifest
from appliance.errors import RefusedError, ValidationError
from appliance.stages.models import importer as models
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
def test_reading_the_gguf_vocabulary_leaves_no_native_warning_on_stderr(
        smol_model: ArtifactRecord, capfd: pytest.CaptureFixture[str]) -> None:
    """Without its weights llama.cpp warned "n_ctx_seq (512) > n_ctx_train (0) -- possible training
    context overflow" in the middle of every GGUF import (seen in the demo's output)."""
    gguf = next((smol_model.path / "gguf").glob("*.gguf"))
    capfd.readouterr()
    llm = models._vocab_only(gguf)
    assert llm.n_vocab() == 49152
    err = capfd.readouterr().err
    assert "n_ctx_train" not in err, err
    os.write(2, b"stderr is back\n")  # the process's stderr was put back
    assert "stderr is back" in capfd.readouterr().err


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
    assert again.returncode == 5 and "Already exists" in again.stderr
    refused = _cli("--home", home, "models", "rm", "tiny")  # no tty, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert _cli("--home", home, "models", "rm", "tiny", "--yes").returncode == 0
    missing = _cli("--home", home, "models", "show", "tiny")
    assert missing.returncode == 4 and "no model named 'tiny'" in missing.stderr


def test_cli_reports_a_changed_byte(tmp_path: Path, tiny_llama: Path) -> None:
    home = tmp_path / "home"
    assert _cli("--home", str(home), "models", "import", str(tiny_llama), "--name", "t").returncode == 0
    config = home / "models" / "t" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"llamb"'))
    out = _cli("--home", str(home), "models", "show", "t", "--verify")
    assert out.returncode == 5 and "content changed (sha256 mismatch): config.json" in out.stderr


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


# -- links inside an imported folder (never followed out of it) ---------------------------------
def _nothing_of(workspace: Workspace, secret: bytes) -> bool:
    """No file in the workspace holds `secret` (a copied link target would)."""
    files = [p for p in workspace.root.rglob("*") if p.is_file()] if workspace.root.exists() else []
    return not any(secret in p.read_bytes() for p in files)


@pytest.mark.parametrize("target", ["/etc/shadow", "secret"])
def test_a_link_out_of_the_folder_is_refused_naming_file_and_target(
        workspace: Workspace, tiny_llama: Path, tmp_path: Path, target: str) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:$6$not-a-real-hash:19000::::::")
    pointed = Path(target) if target.startswith("/") else secret
    (tiny_llama / "extra.txt").symlink_to(pointed)
    with pytest.raises(RefusedError) as err:
        models.import_path(workspace, tiny_llama)
    assert "extra.txt" in str(err.value) and str(pointed) in str(err.value)
    assert workspace.list("model") == []
    assert _nothing_of(workspace, secret.read_bytes())


def test_a_weight_file_linked_from_outside_is_refused(workspace: Workspace, tiny_llama: Path,
                                                     tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    weights = (tiny_llama / "model.safetensors").rename(outside / "model.safetensors")
    (tiny_llama / "model.safetensors").symlink_to(weights)
    with pytest.raises(RefusedError, match=r"model\.safetensors.*elsewhere"):
        models.import_path(workspace, tiny_llama)
    assert workspace.list("model") == []


def test_a_dangling_link_is_refused(workspace: Workspace, tiny_llama: Path) -> None:
    (tiny_llama / "notes.md").symlink_to(tiny_llama / "gone.md")
    with pytest.raises(RefusedError, match=r"notes\.md"):
        models.import_path(workspace, tiny_llama)


def _hf_cache(tmp_path: Path, folder: Path, repo: str = "models--org--Tiny-Chat") -> Path:
    """`folder` laid out as the Hugging Face hub cache does: snapshots/<rev>/<file> are relative
    links to blobs/<sha256>; returns the snapshot folder."""
    import hashlib

    root = tmp_path / "hub" / repo
    blobs, snapshot = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        os.replace(path, blobs / digest)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


def test_a_hugging_face_cache_snapshot_imports_as_regular_private_files(
        workspace: Workspace, tiny_llama: Path, tmp_path: Path) -> None:
    snapshot = _hf_cache(tmp_path, tiny_llama)
    record = models.import_path(workspace, snapshot)
    assert record.name == "tiny-chat"  # named after the repo, not the revision hash
    data = manifest.verify(record.path)
    assert "model.safetensors" in data["files"] and "config.json" in data["files"]
    for rel in data["files"]:
        path = record.path / rel
        assert not path.is_symlink()
        assert os.stat(path).st_mode & 0o077 == 0, f"{rel} is readable by others"


def test_a_cache_link_that_leaves_the_repo_is_refused(workspace: Workspace, tiny_llama: Path,
                                                      tmp_path: Path) -> None:
    snapshot = _hf_cache(tmp_path, tiny_llama)
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    (other / "x").write_text("not this repo's")
    (snapshot / "extra.txt").symlink_to(Path("..") / ".." / ".." / "models--someone--else" / "blobs" / "x")
    with pytest.raises(RefusedError, match=r"extra\.txt"):
        models.import_path(workspace, snapshot)


def test_copied_files_are_private(workspace: Workspace, tiny_llama: Path) -> None:
    for path in tiny_llama.iterdir():
        path.chmod(0o644)
    record = models.import_path(workspace, tiny_llama, name="tiny")
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in record.path.rglob("*")}
    assert modes and all(mode & 0o077 == 0 for mode in modes.values()), modes


# -- config.json against the tensors -------------------------------------------------------------
def _edit_config(folder: Path, **fields: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_hidden_size_that_disagrees_with_the_tensors_is_refused(workspace: Workspace,
                                                                 tmp_path: Path) -> None:
    from tests.conftest import TINY_SHAPE, build_random_llama

    folder = build_random_llama(tmp_path / "wide", **{**TINY_SHAPE, "hidden_size": 96})
    _edit_config(folder, hidden_size=64)
    with pytest.raises(ValidationError) as err:
        models.import_path(workspace, folder)
    message = str(err.value)
    assert "model.embed_tokens.weight" in message and "[49152, 96]" in message
    assert "hidden_size" in message and "config.json" in message
    assert workspace.list("model") == []


@pytest.mark.parametrize(("layers", "named"), [(4, "model.layers.2"), (1, "model.layers.1")])
def test_a_layer_count_that_disagrees_with_the_tensors_is_refused(
        workspace: Workspace, tiny_llama: Path, layers: int, named: str) -> None:
    _edit_config(tiny_llama, num_hidden_layers=layers)  # the tensors hold layers 0 and 1
    with pytest.raises(ValidationError) as err:
        models.import_path(workspace, tiny_llama)
    assert f"num_hidden_layers = {layers}" in str(err.value) and named in str(err.value)


def _tiny(arch: str, folder: Path, **extra: object) -> Path:
    """A tiny random model of a supported architecture, weights and config only."""
    import torch
    import transformers

    torch.manual_seed(0)
    cls = getattr(transformers, arch)
    shape = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    cls(cls.config_class(**{**shape, **extra})).save_pretrained(folder, safe_serialization=True)
    return folder


ARCH_CASES = [
    # architecture, extra config, edit that makes the config wrong, tensor named, field named
    ("LlamaForCausalLM", {}, {"num_key_value_heads": 1}, "self_attn.k_proj.weight",
     "num_key_value_heads"),
    ("LlamaForCausalLM", {"tie_word_embeddings": False}, {"vocab_size": 300},
     "model.embed_tokens.weight", "vocab_size"),
    ("MistralForCausalLM", {}, {"intermediate_size": 128}, "mlp.gate_proj.weight",
     "intermediate_size"),
    ("Qwen2ForCausalLM", {"tie_word_embeddings": True}, {"num_attention_heads": 2, "head_dim": 16},
     "self_attn.q_proj.weight", "num_attention_heads"),
    ("Qwen3ForCausalLM", {"head_dim": 32}, {"head_dim": 16}, "self_attn.q_proj.weight", "head_dim"),
    ("Phi3ForCausalLM", {"pad_token_id": 0}, {"num_key_value_heads": 4},
     "self_attn.qkv_proj.weight", "num_key_value_heads"),
    ("Phi3ForCausalLM", {"pad_token_id": 0}, {"intermediate_size": 64}, "mlp.gate_up_proj.weight",
     "intermediate_size"),
]


@pytest.mark.parametrize(("arch", "extra", "edit", "tensor", "field"), ARCH_CASES)
def test_the_tensor_check_knows_each_supported_architecture(
        tmp_path: Path, arch: str, extra: dict, edit: dict, tensor: str, field: str) -> None:
    folder = _tiny(arch, tmp_path / "m", **extra)
    config = json.loads((folder / "config.json").read_text())
    models.check_tensors(folder, config, [folder / "model.safetensors"])  # as saved: accepted
    with pytest.raises(ValidationError) as err:
        models.check_tensors(folder, {**config, **edit}, [folder / "model.safetensors"])
    assert tensor in str(err.value) and field in str(err.value)


def test_a_missing_output_layer_of_an_untied_model_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _tiny("LlamaForCausalLM", tmp_path / "m", tie_word_embeddings=False)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValidationError, match=r"lm_head\.weight.*tie_word_embeddings"):
        models.check_tensors(folder, config, [folder / "model.safetensors"])


def test_tiny_qwen2_still_imports(workspace: Workspace, tiny_qwen2_source: Path) -> None:
    record = models.import_path(workspace, tiny_qwen2_source, name="q")
    assert record.summary["architecture"] == "Qwen2ForCausalLM"


# -- tokenizer.model that is not SentencePiece ----------------------------------------------------
def test_a_gguf_posing_as_tokenizer_model_is_left_out_when_tokenizer_json_is_complete(
        workspace: Workspace, tiny_llama: Path) -> None:
    _write_gguf(tiny_llama / "tokenizer.model", "llama")  # what transformers saves from a GGUF
    said: list[str] = []
    record = models.import_path(workspace, tiny_llama, name="t", say=said.append)
    data = manifest.verify(record.path)
    assert "tokenizer.model" not in data["files"]
    assert data["info"]["left_out"] == [{"file": "tokenizer.model", "reason": pytest.approx(
        data["info"]["left_out"][0]["reason"])}]
    assert "GGUF" in data["info"]["left_out"][0]["reason"]
    assert any("tokenizer.model" in line and "left out" in line for line in said), said


def test_a_gguf_posing_as_tokenizer_model_is_refused_without_tokenizer_json(
        workspace: Workspace, tiny_llama: Path) -> None:
    _write_gguf(tiny_llama / "tokenizer.model", "llama")
    (tiny_llama / "tokenizer.json").unlink()
    with pytest.raises(ValidationError, match=r"tokenizer\.model.*not a SentencePiece model"):
        models.import_path(workspace, tiny_llama)


# -- progress of a GGUF import --------------------------------------------------------------------
def test_a_gguf_import_reports_its_stages_and_counts_tensors(workspace: Workspace, tiny_llama: Path,
                                                             tmp_path: Path) -> None:
    from appliance import modelio
    from export import gguf

    made = gguf.convert(tiny_llama, tmp_path / "tiny.gguf", outtype="f32")
    link = tmp_path / "cache" / "tiny-f32.gguf"  # a link named by the operator is followed
    link.parent.mkdir()
    link.symlink_to(made)
    events: list[dict] = []
    record = models.import_path(workspace, link, say=lambda _: None,
                                progress=lambda done, total, **f: events.append(
                                    {"done": done, "total": total, **f}))
    assert record.name == "tiny-f32"
    assert (record.path / "gguf" / "tiny-f32.gguf").is_file()
    stages = list(dict.fromkeys(e["stage"] for e in events))
    assert stages == ["read", "copy", "dequantize", "save", "tokenizer", "check", "hash"]
    tensors = modelio.gguf_metadata(made)["_tensor_count"]
    counted = [e for e in events if e["stage"] == "dequantize" and e["total"]]
    assert counted and counted[-1]["done"] == counted[-1]["total"] == tensors
    assert all(e["label"] for e in events)
