"""The bundle's names and the checks every member name and the signed document must pass."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from appliance.errors import IntegrityError

FORMAT = "appliance-bundle/1"
DOC = "bundle.json"
SIG = "bundle.sig"
SIGNER = "signer.pub"
BOM = "bom.cdx.json"
AUDIT = "audit.jsonl"
HEADER = (DOC, SIG, SIGNER)

MAX_DOC = 64 * 2**20  # bundle.json lists files; 64 MiB is millions of them
MAX_SIGNER = 16 * 2**10
SIG_BYTES = 64
BUNDLE_KINDS = ("export",)


class Refused(IntegrityError):
    """A bundle that failed a check: the message names the check and the member."""

    title = "Bundle refused"

    def __init__(self, bundle: str, check: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{bundle}: {check}: {message}", hint=hint)
        self.check = check


def unsafe_name(name: str) -> str | None:
    """Why a member name may not be written under a staging folder, or None if it is safe."""
    if not name or "\x00" in name or "\\" in name:
        return "an empty name, a NUL or a backslash"
    path = PurePosixPath(name)
    if path.is_absolute():
        return "an absolute path"
    if any(part in ("..", ".", "") for part in name.split("/")):
        return "a path that climbs out ('..') or is not normalised"
    if len(path.parts) > 32 or len(name) > 1024:
        return "a path too deep or too long"
    return None


def artifact_prefix(kind: str, name: str) -> str:
    return f"artifacts/{kind}/{name}/"


def parse_doc(bundle: str, raw: bytes) -> dict[str, Any]:
    """bundle.json, its shape checked (a signed document can still be malformed)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(bundle, "format", f"{DOC} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise Refused(bundle, "format", f"{DOC} is not an {FORMAT} document "
                      f"(format {doc.get('format') if isinstance(doc, dict) else None!r})",
                      hint="a bundle from a newer appliance needs that version to import it")
    files, artifacts = doc.get("files"), doc.get("artifacts")
    if not isinstance(files, dict) or not isinstance(artifacts, list) or not artifacts:
        raise Refused(bundle, "format", f"{DOC} lists no files or no artifacts")
    for name, entry in files.items():
        why = unsafe_name(name)
        if why or name in HEADER:
            raise Refused(bundle, "path", f"{DOC} lists {name!r}: {why or 'a reserved name'}")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise Refused(bundle, "format", f"{DOC}: the entry of {name!r} has no size or sha256")
    for art in artifacts:
        if not (isinstance(art, dict) and art.get("kind") in BUNDLE_KINDS
                and isinstance(art.get("name"), str) and unsafe_name(art["name"]) is None
                and "/" not in art["name"] and isinstance(art.get("manifest_sha256"), str)):
            raise Refused(bundle, "format", f"{DOC}: an artifact entry is malformed: {art!r}")
        if f"{artifact_prefix(art['kind'], art['name'])}manifest.json" not in files:
            raise Refused(bundle, "format", f"{DOC}: artifact {art['name']!r} has no manifest.json")
    return doc
