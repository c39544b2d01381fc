"""What a model import reads from the source, checked without a model: links in the folder
(`models.source_files`) and whether a tokenizer.model is SentencePiece (`modelio`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance import modelio
from appliance.errors import RefusedError, ValidationError
from appliance.stages.models import importer as models
from tests.unit.test_gguf_checks import _sentencepiece_model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_plain_files_and_links_inside_the_folder_are_read(folder: Path) -> None:
    (folder / "weights").mkdir()
    (folder / "weights" / "a.safetensors").write_bytes(b"x")
    (folder / "model.safetensors").symlink_to(Path("weights") / "a.safetensors")
    files = models.source_files(folder)
    assert files == {"config.json": folder / "config.json",
                     "model.safetensors": (folder / "weights" / "a.safetensors").resolve()}


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.txt", "sub", "/nonexistent/x"])
def test_links_out_of_the_folder_to_a_directory_or_nowhere_are_refused(
        folder: Path, target: str) -> None:
    (folder.parent / "outside.txt").write_text("outside")
    (folder / "sub").mkdir()
    (folder / "extra.txt").symlink_to(target)
    with pytest.raises(RefusedError) as err:
        models.source_files(folder)
    assert "extra.txt" in err.value.message and target in err.value.message


def test_a_fifo_is_refused(folder: Path) -> None:
    os.mkfifo(folder / "tokenizer.json")
    with pytest.raises(RefusedError, match="not a regular file"):
        models.source_files(folder)


def test_a_hub_snapshot_may_link_into_its_own_blobs_only(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "1234").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/1234")
    assert models.hf_cache_repo(snapshot) == repo
    assert models.source_files(snapshot) == {"config.json": (repo / "blobs" / "1234").resolve()}
    (snapshot / "other.json").symlink_to("../../../models--a--b/blobs/1")
    (tmp_path / "models--a--b" / "blobs").mkdir(parents=True)
    (tmp_path / "models--a--b" / "blobs" / "1").write_text("{}")
    with pytest.raises(RefusedError, match=r"other\.json"):
        models.source_files(snapshot)


def test_a_folder_that_only_looks_like_a_snapshot_gets_no_blobs(tmp_path: Path) -> None:
    snapshot = tmp_path / "x" / "snapshots" / "abc"  # not under models--ORG--NAME
    snapshot.mkdir(parents=True)
    (tmp_path / "x" / "blobs").mkdir()
    (tmp_path / "x" / "blobs" / "1").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/1")
    with pytest.raises(RefusedError, match=r"config\.json"):
        models.source_files(snapshot)


# -- tokenizer.model ---------------------------------------------------------------------------------
def test_a_real_sentencepiece_model_passes(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_sentencepiece_model())
    assert modelio.sentencepiece_problem(path) is None


@pytest.mark.parametrize(("data", "reason"), [
    (b"GGUF\x03\x00\x00\x00" + bytes(32), "GGUF"),
    (b"", "empty"),
    (b"\x00" * 100, "cannot parse"),
    (b"hello, not a model", "cannot parse"),
])
def test_what_is_not_sentencepiece_is_named(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(data)
    assert reason in (modelio.sentencepiece_problem(path) or "")


def test_a_bad_tokenizer_model_with_a_broken_tokenizer_json_is_refused(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(b"GGUF" + bytes(16))
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValidationError, match=r"tokenizer\.model is not a SentencePiece.*GGUF"):
        models.tokenizer_model_left_out(folder)


def test_the_cache_repository_itself_names_a_snapshot_to_import(tmp_path: Path) -> None:
    from appliance.workspace import Workspace

    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    with pytest.raises(ValidationError) as err:
        models.import_path(Workspace(tmp_path / "ws"), repo)
    assert "cache repository" in err.value.message and "snapshots/abc123" in (err.value.hint or "")


def test_a_file_swapped_for_a_link_after_the_scan_is_refused_at_copy(tmp_path: Path) -> None:
    """The scan and the copy are apart in time: the copy itself never follows a link."""
    (tmp_path / "secret").write_text("secret")
    (tmp_path / "extra.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(RefusedError, match="symbolic link"):
        models._copy(tmp_path / "extra.txt", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_fifo_swapped_in_after_the_scan_is_refused_at_copy_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "tokenizer.json")  # a blocking open would wait for a writer forever
    with pytest.raises(RefusedError, match="not a regular file"):
        models._copy(tmp_path / "tokenizer.json", tmp_path / "copy")


def test_the_default_model_is_imported_under_the_name_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`appliance models import --default --name second` (the name was ignored: 'already exists')."""
    from appliance import stack

    seen: list[str | None] = []
    monkeypatch.setattr(stack, "default_model_path", lambda verify=False: tmp_path / "m.gguf")
    monkeypatch.setattr(models, "import_gguf", lambda ws, path, *, name, **_: seen.append(name))
    models.import_default(object(), name="second")  # type: ignore[arg-type]
    models.import_default(object())  # type: ignore[arg-type]
    assert seen == ["second", stack.DEFAULT_MODEL_NAME]
