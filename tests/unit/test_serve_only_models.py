"""Serve-only models (a GGUF imported on the edge profile): the template and stop-token check made
without a tokenizer, the refusals of what needs the full profile, and chat/serve finding a model's
GGUF by the model's name (`engines.resolve`). The real import, end to end with no torch and no
transformers: tests/integration/test_edge_profile.py."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from appliance import chat, profile
from appliance.errors import ApplianceError, NotFoundError, RefusedError
from appliance.runtime.engines import resolve
from appliance.stages.models import importer
from appliance.workspace import ArtifactRecord, Workspace

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
META = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
VOCAB = {"texts": {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}, "eog": [0, 2],
         "size": 100, "tokenize": None, "runtime": "test"}


@pytest.fixture
def edge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profile.OVERRIDE_ENV, "edge")


def test_a_chatml_template_passes_and_records_its_stop_tokens() -> None:
    checked = importer._check_serve_template(Path("m.gguf"), CHATML, META, VOCAB)
    assert checked["stop_token_ids"] == [2] and checked["stop_tokens"] == ["<|im_end|>"]
    assert (checked["bos_token"], checked["eos_token"], checked["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert checked["supports_system"] is True and checked["chat_template"] == CHATML


def test_an_end_of_turn_token_that_is_not_eos_is_recorded_too() -> None:
    template = CHATML.replace("<|im_end|>", "<|endoftext|>")
    checked = importer._check_serve_template(Path("m.gguf"), template, META, VOCAB)
    assert checked["stop_token_ids"] == [2, 0]
    assert checked["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]


def test_a_template_whose_turns_never_stop_is_refused() -> None:
    template = CHATML.replace("<|im_end|>", "<|end|>")
    with pytest.raises(chat.TemplateError, match="does not end assistant turn"):
        importer._check_serve_template(Path("m.gguf"), template, META, VOCAB)


def test_a_template_that_refuses_a_system_turn_is_retried_without() -> None:
    template = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
                + CHATML)
    checked = importer._check_serve_template(Path("m.gguf"), template, META, VOCAB)
    assert checked["supports_system"] is False


def test_a_gguf_that_names_no_end_token_is_refused() -> None:
    with pytest.raises(RefusedError, match="no end-of-generation token"):
        importer._check_serve_template(Path("m.gguf"), CHATML, {}, {**VOCAB, "eog": []})


# -- refusals ------------------------------------------------------------------------------------
def _record(tmp_path: Path, *, serve_only: bool) -> ArtifactRecord:
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    if not serve_only:
        (folder / "config.json").write_text("{}")
    return ArtifactRecord("model", "m", folder, "", "", "ready", {"serve_only": True} if serve_only else {})


def test_a_serve_only_model_cannot_be_trained_even_on_a_full_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profile, "current", lambda: "full")
    with pytest.raises(RefusedError) as err:
        importer.require_trainable(_record(tmp_path, serve_only=True), "merging")
    assert err.value.message.startswith("model 'm' is serve-only") and "merging" in err.value.message
    assert "appliance models rm m" in (err.value.hint or "")
    importer.require_trainable(_record(tmp_path / "hf", serve_only=False))  # an HF model: fine


def test_nothing_is_trainable_on_edge(tmp_path: Path, edge: None) -> None:
    with pytest.raises(RefusedError, match=r"^training needs the full profile \(this install is the edge"):
        importer.require_trainable(_record(tmp_path, serve_only=False))


def test_an_hf_folder_import_on_edge_is_one_line(tmp_path: Path, edge: None) -> None:
    with pytest.raises(RefusedError, match="importing an HF model folder needs the full profile"):
        importer.import_path(Workspace(tmp_path / "ws"), tmp_path)


# -- chat and serve by model name ----------------------------------------------------------------
def _gguf(path: Path, template: str) -> Path:
    """A GGUF header with one metadata value (the chat template) and no tensors."""
    def text(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + text("tokenizer.chat_template")
                     + struct.pack("<I", 8) + text(template))
    return path


def _model(ws: Workspace, name: str, info: dict[str, Any], gguf_template: str | None = CHATML) -> None:
    with ws.writer("model", name) as w:
        if gguf_template is not None:
            (w.path / "gguf").mkdir()
            _gguf(w.path / "gguf" / "m.gguf", gguf_template)
        else:
            (w.path / "config.json").write_text("{}")
            (w.path / "model.safetensors").write_bytes(b"st")
        w.commit(config={}, info={**info, "summary": {}})


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "ws").ensure()
    _model(ws, "served", {"serve_only": True, "gguf_file": "gguf/m.gguf", "chat_template": CHATML})
    _model(ws, "hf", {}, gguf_template=None)
    _model(ws, "retemplated", {"gguf_file": "gguf/m.gguf", "chat_template": "{{ messages }}"})
    _model(ws, "escaping", {"gguf_file": "../served/gguf/m.gguf"})
    return ws


def test_a_model_with_a_gguf_resolves_by_its_name_and_its_path(ws: Workspace) -> None:
    for ref in ("served", str(ws.root / "models" / "served")):
        artifact = resolve(ref, ws)
        assert (artifact.name, artifact.kind, artifact.parity) == ("served", "gguf", "unknown")
        assert artifact.path == ws.root / "models" / "served" / "gguf" / "m.gguf"


def test_an_export_of_the_same_name_wins(ws: Workspace) -> None:
    with ws.writer("export", "served") as w:
        (w.path / "e.gguf").write_bytes(b"GGUF")
        w.commit(config={"format": "gguf"}, info={"summary": {"file": "e.gguf"}},
                 metrics={"parity": {"passed": True}})
    artifact = resolve("served", ws)
    assert artifact.path == ws.root / "exports" / "served" / "e.gguf" and artifact.parity == "pass"


def test_an_hf_model_is_refused_with_what_makes_a_servable_one(ws: Workspace) -> None:
    with pytest.raises(RefusedError, match="model 'hf' is an HF safetensors model") as err:
        resolve("hf", ws)
    assert "appliance export gguf" in (err.value.hint or "")


def test_a_model_imported_with_another_template_is_refused(ws: Workspace) -> None:
    with pytest.raises(RefusedError, match="another chat template"):
        resolve("retemplated", ws)


def test_a_gguf_path_outside_the_model_is_refused(ws: Workspace) -> None:
    with pytest.raises(ApplianceError, match="is missing from"):
        resolve("escaping", ws)


def test_an_unknown_name_lists_exports_and_models(ws: Workspace) -> None:
    with pytest.raises(NotFoundError, match="no export named 'nope'") as err:
        resolve("nope", ws)
    assert "models here: " in (err.value.hint or "") and "served" in (err.value.hint or "")
