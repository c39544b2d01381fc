"""Licences found at import (texts beside the source, GGUF metadata, model card, the operator's
id) and carried to what is made from them (texts copied, GGUF keys, Modelfile LICENSE lines)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance import licences, manifest
from appliance.errors import RefusedError
from appliance.workspace import Workspace, parent_ref
from export.ollama import modelfile_text

APACHE = (" " * 33 + "Apache License\n" + " " * 27 + "Version 2.0, January 2004\n")


@pytest.mark.parametrize(("text", "spdx"), [
    (APACHE, "Apache-2.0"),
    ("**License:** Creative Commons Attribution-ShareAlike 3.0 (CC BY-SA 3.0)", "CC-BY-SA-3.0"),
    ("MIT License\n\nCopyright (c) 2024", "MIT"),
    ("All rights reserved.", None),
])
def test_detect_knows_only_unmistakable_wording(text: str, spdx: str | None) -> None:
    assert licences.detect(text) == spdx


def test_texts_beside_a_file_are_copied_and_an_id_detected(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.jsonl").write_text("{}\n")
    (src / "ATTRIBUTION.md").write_text("Source: dolly. License: CC BY-SA 3.0\n")
    (src / "notes.txt").write_text("not a licence")
    os.symlink("/etc/passwd", src / "LICENSE-link")
    dest = tmp_path / "dest"
    dest.mkdir()
    texts = licences.copy_texts(licences.files_beside(src / "data.jsonl"), dest)
    assert texts == ["licenses/ATTRIBUTION.md"]  # links are never followed
    lic = licences.record({}, texts, dest, attribution="dolly by Databricks")
    assert lic == {"id": "CC-BY-SA-3.0", "detected_from": "licenses/ATTRIBUTION.md",
                   "attribution": "dolly by Databricks", "files": texts}
    assert licences.record({}, [], dest) is None


def test_a_fifo_named_like_a_licence_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "LICENSE")
    (tmp_path / "out").mkdir()
    with pytest.raises(RefusedError, match="not a regular file"):
        licences._safe_copy(tmp_path / "LICENSE", tmp_path / "out" / "LICENSE")


def test_gguf_metadata_and_model_card(tmp_path: Path) -> None:
    meta = {"general.license": "apache-2.0", "general.name": "SmolLM2 135M Instruct",
            "general.organization": "HuggingFaceTB", "general.license.link": "https://x/LICENSE"}
    found = licences.from_gguf(meta)
    assert found["id"] == "apache-2.0" and found["link"] == "https://x/LICENSE"
    assert found["attribution"] == "SmolLM2 135M Instruct by HuggingFaceTB"
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlicense_link: 'https://m'\n---\n# hi\n")
    assert licences.from_model_card(tmp_path) == {"id": "mit", "link": "https://m"}


def _ws_with_lineage(tmp_path: Path) -> tuple[Workspace, list[dict[str, str]]]:
    ws = Workspace(tmp_path / "ws").ensure()
    with ws.writer("model", "base") as w:
        texts = licences.copy_texts([_file(tmp_path / "LICENSE", APACHE)], w.path)
        w.commit(info={"license": licences.record({"attribution": "Base by Org"}, texts, w.path)})
    with ws.writer("dataset", "data") as w:
        w.commit(parents=[parent_ref(ws.get("model", "base"))],
                 info={"license": {"id": "CC-BY-SA-3.0", "attribution": "data by them"}})
    with ws.writer("run", "run") as w:
        w.commit(parents=[parent_ref(ws.get("model", "base")), parent_ref(ws.get("dataset", "data"))])
    return ws, [parent_ref(ws.get("run", "run"))]


def _file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_descendants_carry_the_texts_and_the_lineage(tmp_path: Path) -> None:
    ws, parents = _ws_with_lineage(tmp_path)
    dest = tmp_path / "export"
    dest.mkdir()
    carried = licences.carry(ws, parents, dest)
    assert [(c["role"], c["name"], c["id"]) for c in carried] == [
        ("base model", "base", "Apache-2.0"), ("dataset", "data", "CC-BY-SA-3.0")]
    assert (dest / "licenses" / "model-base" / "LICENSE").read_text() == APACHE
    assert all("path" not in c for c in carried)
    card, override = licences.gguf_metadata(licences.ancestors(ws, parents))
    assert card == {"license": "Apache-2.0"}
    assert override["general.base_models"] == [{"name": "base", "description": "Base by Org"}]
    assert override["general.datasets"] == [{"name": "data", "description": "data by them"}]
    text = modelfile_text("m.gguf", template=None, stop_tokens=[],
                          licences=licences.texts(licences.ancestors(ws, parents)))
    assert f'LICENSE """{APACHE}"""' in text
    manifest.verify(ws.get("model", "base").path)


def test_the_exports_screen_lists_an_exports_licences(tmp_path: Path) -> None:
    from rich.console import Console

    from tui.screens.exports import export_details

    ws, parents = _ws_with_lineage(tmp_path)
    with ws.writer("export", "e") as w:
        w.commit(parents=parents, info={"licenses": licences.carry(ws, parents, w.path)})
    console = Console(width=120, record=True)
    console.print(export_details(ws.get("export", "e").path))
    text = console.export_text()
    assert "base model base: Apache-2.0 - Base by Org" in text
    assert "dataset data: CC-BY-SA-3.0 - data by them" in text
