"""Import a bundle: check it while streaming into staging folders, then put each artifact in place
with its manifest byte for byte, and keep the bundle's own documents (signature, signer, BOM,
lineage, audit lines) as a `bundle` artifact. On any refusal the staging folders are dropped:
nothing is written to the workspace. No torch: an edge install imports bundles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from appliance import manifest
from appliance.errors import NotFoundError
from appliance.progress import QUIET, Reporter
from appliance.stages.bundle import layout, reader
from appliance.stages.bundle.layout import Refused
from appliance.stages.bundle.request import BundleImportRequest

if TYPE_CHECKING:
    from appliance.workspace import ArtifactWriter, Workspace


@dataclass(frozen=True)
class Imported:
    bundle: str
    imported: list[str]
    already: list[str]
    key_id: str | None
    trusted_as: str | None


def _existing(ws: Workspace, bundle: str, doc: dict[str, Any]) -> list[str]:
    """Names already here with the same manifest; a different one is a refusal."""
    same = []
    for art in doc["artifacts"]:
        try:
            record = ws.get(art["kind"], art["name"])
        except NotFoundError:
            continue
        if record.manifest_sha256 != art["manifest_sha256"]:
            raise Refused(bundle, "exists", f"{art['kind']} {art['name']!r} already exists here "
                          "with other content",
                          hint=f"remove it first (appliance exports rm {art['name']}) or keep it")
        same.append(art["name"])
    return same


def _open_member(root: Path, rel: str) -> IO[bytes]:
    path = root / rel
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


def _check_artifact_manifest(bundle: str, staged: Path, art: dict[str, Any],
                             listed: dict[str, dict[str, Any]]) -> None:
    raw = (staged / manifest.MANIFEST).read_bytes()
    if hashlib.sha256(raw).hexdigest() != art["manifest_sha256"]:
        raise Refused(bundle, "hash mismatch", f"the manifest of {art['name']!r} is not the one "
                      f"{layout.DOC} names")
    data = json.loads(raw)
    prefix = layout.artifact_prefix(art["kind"], art["name"])
    mine = {k[len(prefix):]: v for k, v in listed.items() if k.startswith(prefix)}
    mine.pop(manifest.MANIFEST, None)
    recorded = {k: {"size": v["size"], "sha256": v["sha256"]} for k, v in data["files"].items()}
    if mine != recorded or data.get("name") != art["name"] or data.get("kind") != art["kind"]:
        raise Refused(bundle, "manifest", f"the files of {art['name']!r} in the bundle differ "
                      "from its own manifest")


def import_bundle(ws: Workspace, request: BundleImportRequest,
                  reporter: Reporter = QUIET) -> Imported:
    path = Path(request.path)
    bundle = path.name
    ws.ensure()
    with contextlib.ExitStack() as stack:
        writers: dict[str, ArtifactWriter] = {}
        already: list[str] = []
        record_writer: list[ArtifactWriter] = []

        def sink(doc: dict[str, Any]) -> reader.Sink:
            already.extend(_existing(ws, bundle, doc))
            for art in doc["artifacts"]:
                if art["name"] not in already:
                    prefix = layout.artifact_prefix(art["kind"], art["name"])
                    writers[prefix] = stack.enter_context(ws.writer(art["kind"], art["name"]))
            record_writer.append(stack.enter_context(
                ws.writer("bundle", _record_name(doc), replace=True)))

            def target(name: str) -> IO[bytes] | None:
                for prefix, writer in writers.items():
                    if name.startswith(prefix):
                        return _open_member(writer.path, name[len(prefix):])
                if name.startswith("artifacts/"):
                    return None  # an artifact already here, identical: hashed, not written
                return _open_member(record_writer[0].path, name)

            return target

        checked = reader.read(ws, path, allow_unsigned=request.allow_unsigned, sink=sink,
                              reporter=reporter)
        doc = checked.doc
        arts = {layout.artifact_prefix(a["kind"], a["name"]): a for a in doc["artifacts"]}
        for prefix, writer in writers.items():
            _check_artifact_manifest(bundle, writer.path, arts[prefix], doc["files"])
        _stage_header(record_writer[0].path, checked)
        for writer in writers.values():
            writer.commit_as_staged()
        trusted_as = checked.signer.name if checked.signer else None
        record_writer[0].commit(info={"summary": {
            "bundle": doc.get("name"), "artifacts": [a["name"] for a in doc["artifacts"]],
            "key_id": checked.key_id, "trusted_as": trusted_as, "file": str(path),
            "doc_sha256": hashlib.sha256(checked.doc_bytes).hexdigest()}})
    event = "bundle-import" if trusted_as else "bundle-import-unsigned"
    ws.audit(event, bundle=doc.get("name"), file=str(path), key_id=checked.key_id,
             trusted_as=trusted_as, imported=[w.name for w in writers.values()], already=already,
             allow_unsigned=request.allow_unsigned)
    return Imported(str(doc.get("name")), [w.name for w in writers.values()], already,
                    checked.key_id, trusted_as)


def _record_name(doc: dict[str, Any]) -> str:
    from appliance.workspace import slugify

    return slugify(f"{doc.get('name', 'bundle')}-{str(doc.get('created', ''))[:19]}")


def _stage_header(root: Path, checked: reader.Checked) -> None:
    with _open_member(root, layout.DOC) as fh:
        fh.write(checked.doc_bytes)
    if checked.signature is not None:
        with _open_member(root, layout.SIG) as fh:
            fh.write(checked.signature)
    if checked.signer_pem is not None:
        with _open_member(root, layout.SIGNER) as fh:
            fh.write(checked.signer_pem)
