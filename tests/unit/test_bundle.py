"""Bundles on small stand-in exports: create -> verify -> import, and each tampering refused with its
own check, naming the member, with nothing written to the importing workspace."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import audit, manifest, signing
from appliance.stages.bundle import create, importer, reader
from appliance.stages.bundle.layout import Refused
from appliance.stages.bundle.request import BundleCreateRequest, BundleImportRequest
from appliance.workspace import Workspace, parent_ref

Member = tuple[tarfile.TarInfo, bytes | None]


def _source(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "a").ensure()
    with ws.writer("model", "base") as w:
        (w.path / "model.safetensors").write_bytes(b"w" * 4000)
        w.commit(info={"license": {"id": "Apache-2.0", "attribution": "SmolLM2 by HF"}})
    with ws.writer("export", "e1") as w:
        (w.path / "m.gguf").write_bytes(bytes(range(256)) * 40)
        (w.path / "parity.json").write_text('{"passed": true}')
        w.commit(parents=[parent_ref(ws.get("model", "base"))],
                 info={"summary": {"format": "gguf", "type": "Q8_0", "parity": "pass"}})
    signing.create(ws, "boxa")
    return ws


@pytest.fixture
def made(tmp_path: Path) -> tuple[Workspace, Workspace, Path]:
    src = _source(tmp_path)
    out = tmp_path / "e1.bundle"
    create.create(src, BundleCreateRequest.make(["e1"], str(out)))
    dst = Workspace(tmp_path / "b").ensure()
    pub = tmp_path / "boxa.pub"
    pub.write_bytes(signing.own_key(src).pem)
    signing.trust_add(dst, pub, "boxa")
    return src, dst, out


def _members(path: Path) -> list[Member]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
                for m in tar.getmembers()]


def _retar(path: Path, members: list[Member], out: Path | None = None) -> Path:
    out = out or path.with_name("tampered.bundle")
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def _tamper(path: Path, change: Callable[[list[Member]], list[Member]]) -> Path:
    return _retar(path, change(_members(path)))


def _state(ws: Workspace) -> dict[str, object]:
    return {"files": sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*")
                            if ".locks" not in p.parts and not p.name.startswith("appliance.db")),
            "audit": (ws.root / "audit.log").read_bytes() if (ws.root / "audit.log").exists() else b""}


def _refused(dst: Workspace, bundle: Path, check: str, allow: bool = False) -> Refused:
    before = _state(dst)
    with pytest.raises(Refused) as err:
        importer.import_bundle(dst, BundleImportRequest.make(str(bundle), allow))
    assert err.value.check == check, err.value.message
    assert _state(dst) == before  # nothing written, not even a staging folder or an audit line
    return err.value


def test_round_trip_keeps_the_manifest_byte_for_byte(made: tuple[Workspace, Workspace, Path]) -> None:
    src, dst, out = made
    done = importer.import_bundle(dst, BundleImportRequest.make(str(out)))
    assert done.imported == ["e1"] and done.trusted_as == "boxa"
    assert dst.get("export", "e1").manifest_sha256 == src.get("export", "e1").manifest_sha256
    manifest.verify(dst.get("export", "e1").path)
    record = dst.list("bundle")[0]
    bom = json.loads((record.path / "bom.cdx.json").read_text())
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.6"
    refs = {c["bom-ref"] for c in bom["components"]}
    assert {"export:e1", "model:base"} <= refs
    assert (record.path / "lineage" / "model" / "base.json").is_file()
    doc = json.loads((record.path / "bundle.json").read_text())
    assert doc["licenses"][0]["id"] == "Apache-2.0"
    assert doc["licenses"][0]["attribution"] == "SmolLM2 by HF"
    lines = (record.path / "audit.jsonl").read_bytes().splitlines()
    assert any(json.loads(line).get("name") == "e1" for line in lines)
    assert audit.verify(dst.root, dst.connect).ok
    assert [e["event"] for e in audit.entries(dst.root)][-1] == "bundle-import"


def test_the_signature_checks_with_the_public_key_alone(made: tuple[Workspace, Workspace, Path]) -> None:
    src, _, out = made
    parts = {m.name: data for m, data in _members(out)}
    pem = signing.own_key(src).pem
    assert signing.check_signature(pem, parts["bundle.sig"] or b"", parts["bundle.json"] or b"")
    assert parts["signer.pub"] == pem


def test_importing_twice_is_idempotent(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    importer.import_bundle(dst, BundleImportRequest.make(str(out)))
    again = importer.import_bundle(dst, BundleImportRequest.make(str(out)))
    assert again.imported == [] and again.already == ["e1"]


def test_a_wrong_signature_is_refused(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made

    def edit(ms: list[Member]) -> list[Member]:
        return [(m, d.replace(b'"Q8_0"', b'"Q4_0"') if m.name == "bundle.json" and d else d)
                for m, d in ms]

    err = _refused(dst, _tamper(out, edit), "signature")
    assert "bundle.sig" in err.message


def test_an_untrusted_key_is_refused(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    signing.trust_remove(dst, "boxa")
    assert "trust add" in (_refused(dst, out, "untrusted").hint or "")


def test_an_unsigned_bundle_needs_allow_unsigned(tmp_path: Path) -> None:
    src = _source(tmp_path)
    out = tmp_path / "u.bundle"
    create.create(src, BundleCreateRequest.make(["e1"], str(out), unsigned=True))
    dst = Workspace(tmp_path / "c").ensure()
    _refused(dst, out, "unsigned")
    done = importer.import_bundle(dst, BundleImportRequest.make(str(out), allow_unsigned=True))
    assert done.imported == ["e1"] and done.trusted_as is None
    assert [e["event"] for e in audit.entries(dst.root)][-1] == "bundle-import-unsigned"


def _flip(name: str) -> Callable[[list[Member]], list[Member]]:
    def change(ms: list[Member]) -> list[Member]:
        return [(m, bytes([d[0] ^ 1]) + d[1:] if m.name == name and d else d) for m, d in ms]
    return change


def test_a_hash_mismatch_is_refused(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    err = _refused(dst, _tamper(out, _flip("artifacts/export/e1/m.gguf")), "hash mismatch")
    assert "m.gguf" in err.message


def test_a_file_not_listed_is_refused(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    extra = tarfile.TarInfo("artifacts/export/e1/extra.py")
    err = _refused(dst, _tamper(out, lambda ms: [*ms, (extra, b"import os")]), "not listed")
    assert "extra.py" in err.message


def test_a_missing_file_is_refused(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    err = _refused(dst, _tamper(out, lambda ms: [(m, d) for m, d in ms
                                                 if m.name != "artifacts/export/e1/parity.json"]),
                   "missing")
    assert "parity.json" in err.message


@pytest.mark.parametrize(("name", "kind", "check"), [
    ("../evil.sh", tarfile.REGTYPE, "path"),
    ("/etc/cron.d/evil", tarfile.REGTYPE, "path"),
    ("artifacts/export/e1/link", tarfile.SYMTYPE, "member type"),
    ("artifacts/export/e1/hard", tarfile.LNKTYPE, "member type"),
    ("artifacts/export/e1/dev", tarfile.CHRTYPE, "member type"),
])
def test_an_escaping_member_is_refused(made: tuple[Workspace, Workspace, Path], name: str,
                                       kind: bytes, check: str) -> None:
    _, dst, out = made
    evil = tarfile.TarInfo(name)
    evil.type = kind
    evil.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    data = b"x" if kind == tarfile.REGTYPE else None
    members = _members(out)
    err = _refused(dst, _retar(out, [*members[:4], (evil, data), *members[4:]]), check)
    assert name.lstrip("/") in err.message or name in err.message


def test_a_truncated_archive_is_refused(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    cut = out.with_name("cut.bundle")
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    _refused(dst, cut, "truncated")


def test_an_existing_artifact_with_other_content_is_refused(
        made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    with dst.writer("export", "e1") as w:
        (w.path / "m.gguf").write_bytes(b"other")
        w.commit()
    err = _refused(dst, out, "exists")
    assert "e1" in err.message


def test_verify_reads_without_writing(made: tuple[Workspace, Workspace, Path]) -> None:
    _, dst, out = made
    before = _state(dst)
    checked = reader.read(dst, out)
    assert checked.trusted and checked.doc["artifacts"][0]["name"] == "e1"
    assert _state(dst) == before


def test_create_refuses_without_a_key(tmp_path: Path) -> None:
    from appliance.errors import NotFoundError

    src = _source(tmp_path)
    (src.root / ".secrets" / "signing" / "boxa.key").unlink()
    with pytest.raises(NotFoundError, match="signing key"):
        create.create(src, BundleCreateRequest.make(["e1"], str(tmp_path / "x.bundle")))
    assert not (tmp_path / "x.bundle").exists()
