"""API keys for the server: created and revoked by the CLI, stored hashed in the workspace database.

A key is `apk_<id>_<secret>` (id: 8 hex characters, secret: 32 random bytes, urlsafe). It is shown
once, when created; the database keeps its id, name and the SHA-256 of the whole key. A random
256-bit secret needs no slow password hash: nobody can guess it from its hash, and checking a
request costs one indexed lookup and one constant-time compare. The server reads the table on each
request, so a revocation takes effect on the next request without a restart.

On a full disk a revocation still goes through: it may spend the workspace's small reserve
(`Workspace.even_when_full`); with none left, its DiskFullError says to stop the server until there
is room, so the key cannot be used meanwhile. Creating a key gets no such help.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.errors import AlreadyExistsError, DiskFullError, NotFoundError, ValidationError

if TYPE_CHECKING:
    from appliance.workspace import Workspace

KEY_RE = re.compile(r"apk_([0-9a-f]{8})_[A-Za-z0-9_-]{20,100}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
FREE_LATER = "free some space so that the audit log can record what is done"
SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    revoked TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys(name) WHERE revoked IS NULL;
"""


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created: str
    revoked: str | None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@contextmanager
def _db(ws: Workspace) -> Iterator[sqlite3.Connection]:
    """The workspace database (its own connection settings) with the keys table in it."""
    with ws.ensure().connect() as db:
        db.executescript(SCHEMA)
        yield db


def create(ws: Workspace, name: str) -> str:
    """A new key for `name` (returned once; only its hash is stored)."""
    if not NAME_RE.fullmatch(name):
        raise ValidationError(f"key name {name!r} is not allowed",
                              hint="use 1-64 letters, digits, '_', '.', '@' or '-', starting with "
                                   "a letter or digit")
    key_id = secrets.token_hex(4)
    key = f"apk_{key_id}_{secrets.token_urlsafe(32)}"
    try:
        with _db(ws) as db:
            db.execute("INSERT INTO api_keys(id, name, sha256) VALUES (?, ?, ?)",
                       (key_id, name, _digest(key)))
    except sqlite3.IntegrityError:
        raise AlreadyExistsError(f"an active key named {name!r} exists",
                             hint=f"revoke it first (appliance keys revoke {name}) or pick another name"
                             ) from None
    try:
        ws.audit("key-create", id=key_id, name=name)
    except DiskFullError as exc:  # a key nobody was shown must not stay valid
        _withdraw(ws, key_id, exc)
    return key


def _withdraw(ws: Workspace, key_id: str, exc: DiskFullError) -> None:
    try:
        with _db(ws) as db:
            db.execute("DELETE FROM api_keys WHERE id = ?", (key_id,))
    except DiskFullError:
        raise DiskFullError(f"{exc.message}; key {key_id} was created but not shown",
                            hint=f"revoke it once there is room (appliance keys revoke {key_id}); "
                                 f"{exc.hint}") from exc
    raise DiskFullError(f"{exc.message}; no key was created", hint=exc.hint) from exc


def _stop_server_hint(ws: Workspace) -> str:
    return (f"free space at {ws.root} and revoke again; until then the key still works: stop the "
            "server meanwhile (systemctl stop appliance-server, or `appliance jobs cancel` its "
            "serve job) so that it cannot be used")


def _revoke_row(ws: Workspace, name_or_id: str) -> KeyInfo:
    with _db(ws) as db:
        rows = db.execute("SELECT id FROM api_keys WHERE (name = ? OR id = ?) AND revoked IS NULL",
                          (name_or_id, name_or_id)).fetchall()
        if len(rows) > 1:
            raise ValidationError(f"{name_or_id!r} is both a key's name and another key's id",
                                  hint="revoke by the id shown in `appliance keys list`")
        if not rows:
            raise NotFoundError(f"no active key named {name_or_id!r}",
                                hint="see the keys with `appliance keys list`")
        key_id = rows[0][0]
        db.execute("UPDATE api_keys SET revoked = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ?",
                   (key_id,))
        row = db.execute("SELECT id, name, created, revoked FROM api_keys WHERE id = ?",
                         (key_id,)).fetchone()
    return KeyInfo(*row)


def _revoked_row(ws: Workspace, name_or_id: str) -> KeyInfo | None:
    with _db(ws) as db:
        row = db.execute("SELECT id, name, created, revoked FROM api_keys WHERE (name = ? OR id = ?)"
                         " AND revoked IS NOT NULL ORDER BY revoked DESC LIMIT 1",
                         (name_or_id, name_or_id)).fetchone()
    return None if row is None else KeyInfo(*row)


def revoke(ws: Workspace, name_or_id: str) -> KeyInfo:
    """Revoke an active key by name or id; works on a full disk while the reserve lasts."""
    hint = _stop_server_hint(ws)
    attempts: list[int] = []

    def attempt() -> KeyInfo:
        attempts.append(1)
        try:
            return _revoke_row(ws, name_or_id)
        except NotFoundError:
            # the first try may have committed before the disk filled: then the key is revoked
            done = _revoked_row(ws, name_or_id) if len(attempts) > 1 else None
            if done is None:
                raise
            return done

    info = ws.even_when_full(attempt, hint=hint)
    ws.even_when_full(lambda: ws.audit("key-revoke", id=info.id),
                      hint=f"the key is revoked (from the next request on); {FREE_LATER}")
    return info


def list_keys(ws: Workspace) -> list[KeyInfo]:
    if not ws.exists():
        return []
    with _db(ws) as db:
        rows = db.execute("SELECT id, name, created, revoked FROM api_keys ORDER BY rowid").fetchall()
    return [KeyInfo(*r) for r in rows]


class KeyChecker:
    """What the server asks for each request: a short read of the workspace database (a fresh
    connection each time, so any thread may ask, and a revocation counts from the next request)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.uses: dict[str, int] = {}  # key name -> requests it authorised (the audit's use counts)
        self.refused = 0
        with _db(ws):  # the table exists before the first request
            pass

    def name_of(self, key: str | None) -> str | None:
        """The key's name if it is valid and active, else None."""
        match = KEY_RE.fullmatch(key or "")
        if match is None:
            self.refused += 1
            return None
        with self.ws.connect() as db:
            row = db.execute("SELECT name, sha256 FROM api_keys WHERE id = ? AND revoked IS NULL",
                             (match[1],)).fetchone()
        if row is None or not hmac.compare_digest(row[1], _digest(key or "")):
            self.refused += 1
            return None
        self.uses[str(row[0])] = self.uses.get(str(row[0]), 0) + 1
        return str(row[0])
