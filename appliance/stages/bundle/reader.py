"""Check a bundle as it streams, member by member, handing each checked byte to a sink.

The order of checks is the order of the archive: the signed document and its signature first
(a wrong signature or an untrusted signer is refused before any file is read), then every member
(its type, its path, that it is listed, its size, its sha256), then that nothing listed is missing.
A sink decides where a member's bytes go (a staging folder on import, nowhere on verify); on any
refusal the caller drops what the sink wrote.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from appliance import signing
from appliance.progress import QUIET, Reporter
from appliance.stages.bundle import layout
from appliance.stages.bundle.layout import Refused

if TYPE_CHECKING:
    from appliance.workspace import Workspace

CHUNK = 1 << 20
Sink = Callable[[str], IO[bytes] | None]  # member name -> where its bytes go (None: hash only)


@dataclass
class Checked:
    doc: dict[str, Any]
    doc_bytes: bytes
    signature: bytes | None
    signer_pem: bytes | None
    signer: signing.PublicKey | None  # the trusted key that signed it, if any
    key_id: str | None
    files: dict[str, str] = field(default_factory=dict)  # member -> sha256 as read

    @property
    def trusted(self) -> bool:
        return self.signer is not None


def _member_kind(info: tarfile.TarInfo) -> str | None:
    if info.isreg():
        return None
    if info.issym() or info.islnk():
        return f"a link (to {info.linkname!r})"
    if info.isdev() or info.isfifo():
        return "a device or FIFO"
    return "a folder or special entry" if info.isdir() else "not a regular file"


def _read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int, bundle: str) -> bytes:
    if not info.isreg() or info.size > limit:
        raise Refused(bundle, "format", f"{info.name} is not a regular file of at most {limit} bytes")
    fh = tar.extractfile(info)
    assert fh is not None
    data = fh.read()
    if len(data) != info.size:
        raise Refused(bundle, "truncated", f"the archive ends inside {info.name}")
    return data


def _header(tar: tarfile.TarFile, bundle: str) -> tuple[bytes, bytes | None, bytes | None,
                                                          tarfile.TarInfo | None]:
    first = tar.next()
    if first is None:
        raise Refused(bundle, "truncated", "the archive is empty")
    if first.name != layout.DOC:
        raise Refused(bundle, "format", f"the first member is {first.name!r}, not {layout.DOC}")
    doc = _read_small(tar, first, layout.MAX_DOC, bundle)
    sig = pem = None
    info = tar.next()
    if info is not None and info.name == layout.SIG:
        sig = _read_small(tar, info, layout.SIG_BYTES, bundle)
        info = tar.next()
    if info is not None and info.name == layout.SIGNER:
        pem = _read_small(tar, info, layout.MAX_SIGNER, bundle)
        info = tar.next()
    return doc, sig, pem, info


def _check_signature(ws: Workspace, bundle: str, doc: bytes, sig: bytes | None, pem: bytes | None,
                     allow_unsigned: bool) -> tuple[signing.PublicKey | None, str | None]:
    if sig is None:
        if allow_unsigned:
            return None, None
        raise Refused(bundle, "unsigned", f"the bundle has no {layout.SIG}",
                      hint="import it only if you know where it came from: --allow-unsigned")
    if pem is None:
        raise Refused(bundle, "signature", f"{layout.SIG} is present but {layout.SIGNER} is not")
    try:
        key_id = signing.key_id_of(pem)
        valid = len(sig) == layout.SIG_BYTES and signing.check_signature(pem, sig, doc)
    except Exception as exc:  # a malformed key is a refusal, whatever the library raised
        raise Refused(bundle, "signature", f"{layout.SIGNER} is not a usable key ({exc})") from None
    if not valid:
        raise Refused(bundle, "signature", f"{layout.SIG} does not match {layout.DOC} under key "
                      f"{key_id}: the document was changed after signing, or signed by another key")
    signer = signing.find_trusted(ws, pem)
    if signer is None and not allow_unsigned:
        raise Refused(bundle, "untrusted", f"signed by key {key_id}, which this workspace does "
                      "not trust",
                      hint="get the signer's public key by a trusted route and run `appliance "
                           "trust add KEY.pub --name NAME`, or pass --allow-unsigned")
    return signer, key_id


def read(ws: Workspace, path: Path, *, allow_unsigned: bool = False,
         sink: Callable[[dict[str, Any]], Sink] | None = None,
         reporter: Reporter = QUIET) -> Checked:
    """Check the bundle at `path`; `sink(doc)` (called once the signature is accepted) gives
    where each member goes. Raises `Refused` naming the check and the member."""
    bundle = path.name
    try:
        fileobj = open(path, "rb")  # noqa: SIM115 - closed below; tarfile does not own it
    except OSError as exc:
        raise Refused(bundle, "open", f"cannot read {path}: {exc.strerror}") from None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            return _read(ws, tar, bundle, allow_unsigned, sink, reporter)
    except (tarfile.ReadError, EOFError) as exc:
        what = "the archive is cut short" if "end" in str(exc).lower() or isinstance(exc, EOFError) \
            else f"not a tar archive ({exc})"
        raise Refused(bundle, "truncated", what) from None
    finally:
        fileobj.close()


def _read(ws: Workspace, tar: tarfile.TarFile, bundle: str, allow_unsigned: bool,
          sink: Callable[[dict[str, Any]], Sink] | None, reporter: Reporter) -> Checked:
    doc_bytes, sig, pem, info = _header(tar, bundle)
    signer, key_id = _check_signature(ws, bundle, doc_bytes, sig, pem, allow_unsigned)
    doc = layout.parse_doc(bundle, doc_bytes)
    checked = Checked(doc, doc_bytes, sig, pem, signer, key_id)
    listed: dict[str, dict[str, Any]] = doc["files"]
    target = sink(doc) if sink else None
    total = sum(e["size"] for e in listed.values()) or 1
    done = 0
    while info is not None:
        done += _member(tar, info, bundle, listed, checked, target)
        reporter.progress(done, total, stage="check-files", label="checking the bundle",
                          unit="bytes")
        reporter.check_cancel()
        info = tar.next()
    missing = sorted(set(listed) - set(checked.files))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise Refused(bundle, "missing", f"listed but not in the archive: {', '.join(missing[:5])}"
                      f"{more}")
    return checked


def _member(tar: tarfile.TarFile, info: tarfile.TarInfo, bundle: str,
            listed: dict[str, dict[str, Any]], checked: Checked, target: Sink | None) -> int:
    name = info.name
    if (why := _member_kind(info)) is not None:
        raise Refused(bundle, "member type", f"{name!r} is {why}; a bundle holds regular files only")
    if (why := layout.unsafe_name(name)) is not None:
        raise Refused(bundle, "path", f"{name!r} is {why}")
    if name in layout.HEADER:
        raise Refused(bundle, "format", f"{name} appears again, after the files began")
    if name not in listed:
        raise Refused(bundle, "not listed", f"{name!r} is not in {layout.DOC}")
    if name in checked.files:
        raise Refused(bundle, "duplicate", f"{name!r} appears twice")
    if info.size != listed[name]["size"]:
        raise Refused(bundle, "size", f"{name!r} is {info.size} bytes; {layout.DOC} says "
                      f"{listed[name]['size']}")
    src = tar.extractfile(info)
    assert src is not None
    out = target(name) if target else None
    digest, got = hashlib.sha256(), 0
    try:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            got += len(chunk)
            if out is not None:
                out.write(chunk)
    finally:
        if out is not None:
            out.close()
    if got != info.size:
        raise Refused(bundle, "truncated", f"the archive ends inside {name!r}")
    sha = digest.hexdigest()
    if sha != listed[name]["sha256"]:
        raise Refused(bundle, "hash mismatch", f"{name!r} has sha256 {sha[:16]}…, "
                      f"{layout.DOC} says {listed[name]['sha256'][:16]}…")
    checked.files[name] = sha
    return got
