"""Signing keys made and kept by the appliance, and the store of keys it trusts.

Ed25519 through `cryptography` (the Python Cryptographic Authority's library, already what pip,
sigstore and most of PyPI rest on). A signature is the raw 64-byte Ed25519 signature over the exact
bytes of a document (a bundle's `bundle.json`, an exported audit trail), so anyone can check one
with a standard tool and no appliance:

    openssl pkeyutl -verify -pubin -inkey signer.pub -rawin -in bundle.json -sigfile bundle.sig

Why not OpenSSF model-signing (measured, 1.1.1): with a local key it signs only EC P-256/384/521
(Ed25519 and RSA fail), brings sigstore and 34 more packages (~71 MB) to the edge box, does not
import after a plain install (pyOpenSSL undeclared), its CLI cannot unlock an encrypted key, and it
signs a folder, where a bundle already has one document listing every file's sha256 (PITFALLS.md,
"Signing").

Private keys live in `.secrets/signing/NAME.key` (PKCS#8 PEM, 0600, in a 0700 folder of the
0700 workspace) and never leave it unencrypted: `export --private` writes them encrypted under a
passphrase (PKCS#8 with the library's best available encryption). Public keys are
`NAME.pub` (SubjectPublicKeyInfo PEM). A key's id is the first 16 hex digits of the sha256 of its
raw 32-byte public key. Trusted keys are the workspace's own signing keys and those added to
`trust/NAME.pub`. Every change is an audit line.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import AlreadyExistsError, NotFoundError, RefusedError, ValidationError
from appliance.fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from appliance.workspace import Workspace

KEYS_DIR = Path(".secrets") / "signing"
TRUST_DIR = "trust"
DEFAULT_FILE = "DEFAULT"
ALGORITHM = "ed25519"


@dataclass(frozen=True)
class PublicKey:
    name: str
    key_id: str
    pem: bytes
    source: str  # "own" | "trusted"


def key_id_of(pem: bytes) -> str:
    """The id of a public key given as PEM; a ValidationError if it is not an Ed25519 key."""
    return hashlib.sha256(_raw_public(pem)).hexdigest()[:16]


def _raw_public(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValidationError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValidationError(f"not an Ed25519 public key ({type(key).__name__})",
                              hint="the appliance signs and checks with Ed25519 keys only")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _keys_dir(ws: Workspace) -> Path:
    ws.ensure()
    path = ws.root / KEYS_DIR
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _check_key_name(name: str) -> str:
    from appliance.workspace import check_name

    return check_name(name, "key name")


# -- own keys --------------------------------------------------------------------------------------
def create(ws: Workspace, name: str) -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    folder = _keys_dir(ws)
    _check_key_name(name)
    if (folder / f"{name}.key").exists():
        raise AlreadyExistsError(f"a signing key named {name!r} already exists",
                                 hint="pick another name (appliance signing-key list)")
    private = ed25519.Ed25519PrivateKey.generate()
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(folder / f"{name}.pub", pub_pem)
    atomic_write_bytes(folder / f"{name}.key", key_pem)
    if not (folder / DEFAULT_FILE).exists():
        atomic_write_bytes(folder / DEFAULT_FILE, name.encode())
    key = PublicKey(name, key_id_of(pub_pem), pub_pem, "own")
    ws.audit("signing-key-create", key=name, key_id=key.key_id)
    return key


def own_keys(ws: Workspace) -> list[PublicKey]:
    folder = ws.root / KEYS_DIR
    if not folder.is_dir():
        return []
    return [_public(p, "own") for p in sorted(folder.glob("*.pub")) if (folder / f"{p.stem}.key").exists()]


def _public(path: Path, source: str) -> PublicKey:
    pem = path.read_bytes()
    return PublicKey(path.stem, key_id_of(pem), pem, source)


def default_name(ws: Workspace) -> str | None:
    path = ws.root / KEYS_DIR / DEFAULT_FILE
    return path.read_text().strip() if path.exists() else None


def own_key(ws: Workspace, name: str | None = None) -> PublicKey:
    """The named key, or the default one; a NotFoundError that says how to make one."""
    keys = own_keys(ws)
    if not keys:
        raise NotFoundError("this workspace has no signing key",
                            hint="make one: appliance signing-key create NAME")
    wanted = name or default_name(ws) or keys[0].name
    for key in keys:
        if key.name == wanted:
            return key
    raise NotFoundError(f"no signing key named {wanted!r}",
                        hint=f"keys: {', '.join(k.name for k in keys)}")


def sign(ws: Workspace, data: bytes, name: str | None = None) -> tuple[PublicKey, bytes]:
    """(the key used, the 64-byte Ed25519 signature of `data`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = own_key(ws, name)
    private = serialization.load_pem_private_key(
        (ws.root / KEYS_DIR / f"{key.name}.key").read_bytes(), password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    return key, private.sign(data)


def export_private(ws: Workspace, name: str, passphrase: bytes) -> bytes:
    """The private key as encrypted PKCS#8 PEM; refused without a passphrase of 8+ characters."""
    from cryptography.hazmat.primitives import serialization

    if len(passphrase) < 8:
        raise ValidationError("a private key leaves the workspace only encrypted: give a "
                              "passphrase of at least 8 characters")
    key = own_key(ws, name)
    private = serialization.load_pem_private_key(
        (ws.root / KEYS_DIR / f"{key.name}.key").read_bytes(), password=None)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(passphrase))
    ws.audit("signing-key-export", key=key.name, key_id=key.key_id, private=True)
    return pem


def check_signature(pem: bytes, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PublicKey.from_public_bytes(_raw_public(pem))
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


# -- trust -----------------------------------------------------------------------------------------
def trusted(ws: Workspace) -> list[PublicKey]:
    """Every key whose signature this workspace accepts: its own and the added ones."""
    folder = ws.root / TRUST_DIR
    added = [_public(p, "trusted") for p in sorted(folder.glob("*.pub"))] if folder.is_dir() else []
    return own_keys(ws) + added


def trust_add(ws: Workspace, pem_path: Path, name: str) -> PublicKey:
    _check_key_name(name)
    ws.ensure()  # the first thing an operator does on a new edge box
    try:
        pem = pem_path.read_bytes()
    except OSError as exc:
        raise NotFoundError(f"cannot read public key {pem_path}: {exc.strerror}") from exc
    if b"PRIVATE KEY" in pem:
        raise RefusedError(f"{pem_path} is a private key: trust takes the public key (NAME.pub)")
    key_id = key_id_of(pem)
    for key in trusted(ws):
        if key.key_id == key_id:
            raise AlreadyExistsError(f"key {key_id} is already trusted as {key.name!r} ({key.source})")
        if key.name == name and key.source == "trusted":
            raise AlreadyExistsError(f"a trusted key named {name!r} already exists",
                                     hint="pick another --name, or remove it first")
    folder = ws.root / TRUST_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    atomic_write_bytes(folder / f"{name}.pub", pem)
    ws.audit("trust-add", key=name, key_id=key_id)
    return PublicKey(name, key_id, pem, "trusted")


def trust_remove(ws: Workspace, name: str) -> PublicKey:
    path = ws.root / TRUST_DIR / f"{_check_key_name(name)}.pub"
    if not path.exists():
        raise NotFoundError(f"no trusted key named {name!r}",
                            hint="appliance trust list shows them (own keys cannot be removed here)")
    key = _public(path, "trusted")
    os.unlink(path)
    ws.audit("trust-remove", key=name, key_id=key.key_id)
    return key


def find_trusted(ws: Workspace, pem: bytes) -> PublicKey | None:
    key_id = key_id_of(pem)
    return next((k for k in trusted(ws) if k.key_id == key_id), None)
