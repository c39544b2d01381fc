"""The audit trail handed to an auditor: the log's lines as written, a head document (line count,
the last line's hash, the file's sha256, the verdict of `audit verify` at export time, the
signer's public key) and an Ed25519 signature of that head (`appliance.signing`).

An auditor needs no appliance to check it: `openssl pkeyutl -verify -pubin -inkey signer.pub
-rawin -in FILE.head.json -sigfile FILE.head.sig`, then `sha256sum FILE` against the head, then the
`prev` links (each line's sha256 is the next line's `prev`). The lines' MACs are kept but their key
is not exported: the signature over the head is what vouches for the file outside the box.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import audit, manifest, signing
from appliance.errors import IntegrityError, NotFoundError
from appliance.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from appliance.workspace import Workspace


@dataclass(frozen=True)
class Exported:
    path: Path
    signature: Path
    lines: int
    head: str
    key_id: str


def _paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".head.json"), path.with_name(path.name + ".head.sig")


def export(ws: Workspace, path: Path, *, key_name: str | None = None) -> Exported:
    key = signing.own_key(ws, key_name)
    verdict = audit.verify(ws.root, ws.connect)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(ws.root / audit.LOG, "rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    sha, count, last = _digest(tmp, strict=False)  # a broken log is exported as it is, said so
    head = {"format": "appliance-audit-export/1", "exported": manifest.now_iso(),
            "user": audit.os_user(), "workspace": str(ws.root), "file": path.name,
            "sha256": sha, "lines": count, "last_line_sha256": last, "verify_ok": verdict.ok,
            "findings": [f.__dict__ for f in verdict.findings][:100], "key_id": key.key_id,
            "public_key": key.pem.decode()}
    head_bytes = (json.dumps(head, indent=2, sort_keys=True) + "\n").encode()
    _, sig = signing.sign(ws, head_bytes, key.name)
    head_path, sig_path = _paths(path)
    tmp.replace(path)
    atomic_write_bytes(head_path, head_bytes)
    atomic_write_bytes(sig_path, sig)
    ws.audit("audit-export", file=str(path), lines=count, head=last, key_id=key.key_id)
    return Exported(path, sig_path, count, last, key.key_id)


def _digest(path: Path, *, strict: bool = True) -> tuple[str, int, str]:
    """(sha256 of the file, its line count, the sha256 of its last line); the prev links checked."""
    whole = hashlib.sha256()
    count, prev = 0, audit.ZERO
    for raw in audit.iter_lines(path):
        whole.update(raw)
        count += 1
        line = raw.rstrip(b"\n")
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if strict and (not isinstance(entry, dict) or entry.get("prev") != prev):
            raise IntegrityError(f"{path}: line {count} does not chain onto the line before it")
        prev = audit.line_hash(line)
    return whole.hexdigest(), count, prev


def check(path: Path, public_key: Path) -> Exported:
    """Check an exported trail: the head's signature by `public_key`, the file's sha256, the chain."""
    head_path, sig_path = _paths(path)
    for needed in (path, head_path, sig_path, public_key):
        if not needed.exists():
            raise NotFoundError(f"{needed} is missing")
    head_bytes = head_path.read_bytes()
    pem = public_key.read_bytes()
    if not signing.check_signature(pem, sig_path.read_bytes(), head_bytes):
        raise IntegrityError(f"{sig_path}: the signature does not match {head_path.name} "
                             f"under key {signing.key_id_of(pem)}")
    head = json.loads(head_bytes)
    sha, count, last = _digest(path)
    if sha != head["sha256"] or count != head["lines"] or last != head["last_line_sha256"]:
        raise IntegrityError(f"{path}: its content is not what the signed head describes "
                             f"(sha256 {sha[:16]}…, {count} lines; signed: {head['sha256'][:16]}…, "
                             f"{head['lines']} lines)")
    return Exported(path, sig_path, count, last, signing.key_id_of(pem))
