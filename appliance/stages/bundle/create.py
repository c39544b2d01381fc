"""Write a bundle: check each export against its manifest, gather its lineage, licences, BOM and
audit lines, sign the document that lists every member's sha256, then stream the archive, hashing
every artifact file again as it is written (a file changed in between stops the write)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from appliance import __version__, audit, manifest, signing
from appliance.errors import IntegrityError
from appliance.progress import QUIET, Reporter
from appliance.stages.bundle import bom, layout
from appliance.stages.bundle.request import BundleCreateRequest
from appliance.workspace import ancestors

if TYPE_CHECKING:
    from appliance.workspace import ArtifactRecord, Workspace

CHUNK = 1 << 20


@dataclass(frozen=True)
class Created:
    path: Path
    name: str
    size: int
    artifacts: list[str]
    key_id: str | None
    doc_sha256: str


def lineage(ws: Workspace, manifests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every ancestor's manifest (each once, nearest first, the artifacts' own left out), and the
    ones this workspace lacks."""
    own = {(str(m["kind"]), str(m["name"])) for m in manifests}
    found, missing = [], []
    for ref, record, data in ancestors(ws, [p for m in manifests for p in m.get("parents", [])]):
        key = (str(ref.get("kind")), str(ref.get("name")))
        if key in own:
            continue
        if record is None or data is None:
            missing.append(f"{key[0]} {key[1]}")
            continue
        data["_manifest_sha256"] = record.manifest_sha256
        if ref.get("manifest_sha256") and ref["manifest_sha256"] != record.manifest_sha256:
            data["_changed_since_child"] = True
        found.append(data)
    return found, missing


def _audit_lines(ws: Workspace, subjects: set[tuple[str, str]]) -> bytes:
    """The raw audit lines (MACs kept) whose subject is in the lineage."""
    names = {name for _, name in subjects}
    out = io.BytesIO()
    for _, raw, entry in audit.parsed_lines(ws.root / audit.LOG):
        kind, name = entry.get("kind"), entry.get("name")
        if (kind, name) in subjects or (kind is None and name in names):
            out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    return out.getvalue()


def _licences(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The licences of the models and datasets in the lineage (each once): what the artifacts
    carry (`info.licenses`) and what the ancestors recorded at import (`info.license`)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for data in manifests:
        for lic in data.get("info", {}).get("licenses") or []:
            found.setdefault((str(lic.get("kind")), str(lic.get("name"))), lic)
        own = data.get("info", {}).get("license")
        if own:
            key = (str(data.get("kind")), str(data.get("name")))
            found.setdefault(key, {"kind": key[0], "name": key[1], **own})
    return list(found.values())


def _plan(ws: Workspace, request: BundleCreateRequest, reporter: Reporter) -> tuple[
        list[ArtifactRecord], dict[str, bytes], dict[str, tuple[Path, dict[str, Any]]], dict[str, Any]]:
    records = [ws.get("export", n) for n in request.exports]
    artifact_files: dict[str, tuple[Path, dict[str, Any]]] = {}
    manifests = []
    total = sum(f["size"] for r in records for f in manifest.read(r.path)["files"].values()) or 1
    done = 0
    for record in records:
        reporter.log(f"checking {record.name} against its manifest")
        data = manifest.verify(record.path, full=True)
        data["_manifest_sha256"] = record.manifest_sha256
        manifests.append(data)
        prefix = layout.artifact_prefix("export", record.name)
        for rel, entry in sorted(data["files"].items()):
            artifact_files[prefix + rel] = (record.path / rel, entry)
            done += entry["size"]
            reporter.progress(done, total, stage="check-files", label="checking files", unit="bytes")
        raw = (record.path / manifest.MANIFEST).read_bytes()
        artifact_files[prefix + manifest.MANIFEST] = (record.path / manifest.MANIFEST, {
            "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
    parents, missing = lineage(ws, manifests)
    if missing:
        reporter.log(f"not in this workspace, so not in the bundle: {', '.join(missing)}")
    subjects = {(str(m["kind"]), str(m["name"])) for m in [*manifests, *parents]}
    small: dict[str, bytes] = {
        f"lineage/{m['kind']}/{m['name']}.json":
            (json.dumps({k: v for k, v in m.items() if not k.startswith("_")}, indent=2,
                        sort_keys=True) + "\n").encode() for m in parents}
    small[layout.AUDIT] = _audit_lines(ws, subjects)
    versions = manifests[0].get("versions", {})
    small[layout.BOM] = bom.build(manifests, parents, versions, __version__).encode()
    info = {"lineage": [{"kind": m["kind"], "name": m["name"],
                         "manifest_sha256": m["_manifest_sha256"],
                         "changed_since_child": bool(m.get("_changed_since_child"))}
                        for m in parents],
            "lineage_missing": missing, "licenses": _licences([*manifests, *parents]),
            "manifests": manifests}
    return records, small, artifact_files, info


def create(ws: Workspace, request: BundleCreateRequest, reporter: Reporter = QUIET) -> Created:
    records, small, artifact_files, info = _plan(ws, request, reporter)
    key = None if request.unsigned else signing.own_key(ws, request.key)
    files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
             for name, data in small.items()}
    files.update({name: {"size": e["size"], "sha256": e["sha256"]}
                  for name, (_, e) in artifact_files.items()})
    name = request.bundle_name()
    doc = {"format": layout.FORMAT, "name": name, "created": manifest.now_iso(),
           "creator": {"user": audit.os_user(), "appliance": __version__},
           "artifacts": [{"kind": "export", "name": r.name, "manifest_sha256": r.manifest_sha256,
                          "status": r.status, "summary": r.summary} for r in records],
           "lineage": info["lineage"], "lineage_missing": info["lineage_missing"],
           "licenses": info["licenses"], "versions": info["manifests"][0].get("versions", {}),
           "signer": {"algorithm": signing.ALGORITHM, "key_id": key.key_id} if key else None,
           "files": files}
    doc_bytes = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    sig = signing.sign(ws, doc_bytes, key.name)[1] if key else None
    out = Path(request.output)
    size = _write(out, doc_bytes, sig, key.pem if key else None, small, artifact_files, reporter)
    doc_sha = hashlib.sha256(doc_bytes).hexdigest()
    ws.audit("bundle-create", bundle=name, file=str(out), exports=[r.name for r in records],
             key_id=key.key_id if key else None, doc_sha256=doc_sha, size=size)
    return Created(out, name, size, [r.name for r in records], key.key_id if key else None, doc_sha)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, 0
    info.uname = info.gname = ""
    return info


class _Hashing(io.RawIOBase):
    """A file read through sha256, for checking a file did not change since it was checked."""

    def __init__(self, fh: IO[bytes], on_read: Any) -> None:
        self.fh, self.digest, self.on_read = fh, hashlib.sha256(), on_read

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.digest.update(data)
        self.on_read(len(data))
        return data


def _write(out: Path, doc: bytes, sig: bytes | None, pem: bytes | None, small: dict[str, bytes],
           artifact_files: dict[str, tuple[Path, dict[str, Any]]], reporter: Reporter) -> int:
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    total = sum(e["size"] for _, e in artifact_files.values()) or 1
    written = [0]

    def moved(n: int) -> None:
        written[0] += n
        if written[0] % (64 * CHUNK) < n or written[0] == total:
            reporter.progress(written[0], total, stage="write", label="writing the bundle",
                              unit="bytes")
            reporter.check_cancel()

    try:
        with open(tmp, "xb") as fh, tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(layout.DOC, len(doc)), io.BytesIO(doc))
            if sig is not None and pem is not None:
                tar.addfile(_info(layout.SIG, len(sig)), io.BytesIO(sig))
                tar.addfile(_info(layout.SIGNER, len(pem)), io.BytesIO(pem))
            for name, data in small.items():
                tar.addfile(_info(name, len(data)), io.BytesIO(data))
            for name, (path, entry) in artifact_files.items():
                with open(path, "rb") as src:
                    reader = _Hashing(src, moved)
                    tar.addfile(_info(name, entry["size"]), reader)
                if reader.digest.hexdigest() != entry["sha256"]:
                    raise IntegrityError(f"{path} changed while the bundle was written",
                                         hint="nothing was kept; run bundle create again")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size
