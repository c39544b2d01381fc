"""The workspace: one directory (APPLIANCE_HOME) holding every artifact, an SQLite index and an
audit log.

    models/<name>/     datasets/<name>/     runs/<id>/     exports/<id>/     bundles/
    appliance.db       (SQLite, WAL: the registry index and, later, jobs)
    audit.log          (append-only, hash-chained)

The directories are the truth; the database is an index rebuilt from manifests when they disagree
(`reconcile`). Artifacts are written by `ArtifactWriter`: into a hidden staging directory under a
per-artifact lock, then renamed into place with their manifest, so a half-written artifact is never
visible and two processes never write the same one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import manifest
from appliance.errors import ApplianceError, BusyError, NotFoundError, ValidationError
from appliance.fsutil import FileLock, blocking_lock, exchange, fsync_dir

KIND_DIRS = {"model": "models", "dataset": "datasets", "run": "runs", "export": "exports",
             "bundle": "bundles"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
STAGING_PREFIX = ".staging-"
STAGING_RE = re.compile(r"-\d+-[0-9a-f]{8}")  # what follows ".staging-<name>": -<pid>-<hex>

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS artifacts (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    created TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ready',
    summary TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (kind, name)
);
"""


def default_home() -> Path:
    if env := os.environ.get("APPLIANCE_HOME"):
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "appliance"


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise ValidationError(
            f"invalid {what} {name!r}",
            hint="use 1-80 characters: letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
        )
    return name


def slugify(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:80]
    return slug.lower() or "artifact"


@dataclass(frozen=True)
class ArtifactRecord:
    kind: str
    name: str
    path: Path
    created: str
    manifest_sha256: str
    status: str
    summary: dict[str, Any]


class Workspace:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_home()).expanduser().resolve()

    # -- layout -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "appliance.db").exists()

    def ensure(self) -> Workspace:
        for sub in KIND_DIRS.values():
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / ".locks").mkdir(exist_ok=True)
        # Switching to WAL needs an exclusive lock that SQLite's busy handler does not wait for,
        # so creating the database is serialised between processes (WAL then persists in the file).
        with blocking_lock(self.root / ".locks" / "db.lock"), self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA_SQL)
        return self

    def kind_dir(self, kind: str) -> Path:
        if kind not in KIND_DIRS:
            raise ValidationError(f"unknown artifact kind {kind!r}; known: {', '.join(KIND_DIRS)}")
        return self.root / KIND_DIRS[kind]

    def artifact_dir(self, kind: str, name: str) -> Path:
        return self.kind_dir(kind) / check_name(name)

    # -- database ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        self.root.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "appliance.db", timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        finally:
            db.close()

    def _upsert(self, db: sqlite3.Connection, kind: str, path: Path, data: dict) -> None:
        sha = hashlib.sha256((path / manifest.MANIFEST).read_bytes()).hexdigest()
        db.execute(
            "INSERT OR REPLACE INTO artifacts(kind, name, path, created, manifest_sha256, status,"
            " summary) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (kind, path.name, str(path), data.get("created", ""), sha,
             data.get("status", "ready"), json.dumps(data.get("info", {}).get("summary", {}))),
        )

    def register(self, kind: str, path: Path) -> None:
        data = manifest.read(path)
        with self.connect() as db:
            self._upsert(db, kind, path, data)

    def reconcile(self) -> None:
        """Make the index match the directories: add or refresh committed artifacts (a moved
        workspace, an edited manifest), drop the ones that vanished."""
        self.ensure()
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = {(k, n): (p, sha) for k, n, p, sha in
                    db.execute("SELECT kind, name, path, manifest_sha256 FROM artifacts")}
            seen = set()
            for kind in KIND_DIRS:
                for path in sorted(self.kind_dir(kind).iterdir()):
                    mpath = path / manifest.MANIFEST
                    if path.name.startswith(".") or not mpath.is_file():
                        continue
                    seen.add((kind, path.name))
                    sha = hashlib.sha256(mpath.read_bytes()).hexdigest()
                    if rows.get((kind, path.name)) != (str(path), sha):
                        with contextlib.suppress(ApplianceError):
                            self._upsert(db, kind, path, manifest.read(path))
            for kind, name in rows.keys() - seen:
                db.execute("DELETE FROM artifacts WHERE kind=? AND name=?", (kind, name))
            db.execute("COMMIT")

    def list(self, kind: str) -> list[ArtifactRecord]:
        self.kind_dir(kind)
        if not self.root.exists():
            return []
        self.reconcile()
        with self.connect() as db:
            rows = db.execute(
                "SELECT kind, name, path, created, manifest_sha256, status, summary FROM artifacts"
                " WHERE kind=? ORDER BY created, name", (kind,)).fetchall()
        return [ArtifactRecord(k, n, Path(p), c, s, st, json.loads(su))
                for k, n, p, c, s, st, su in rows]

    def get(self, kind: str, name: str) -> ArtifactRecord:
        for record in self.list(kind):
            if record.name == name:
                return record
        available = ", ".join(r.name for r in self.list(kind)) or "none"
        raise NotFoundError(
            f"no {kind} named {name!r} in {self.root}",
            hint=f"available {KIND_DIRS[kind]}: {available}",
        )

    def remove(self, kind: str, name: str) -> Path:
        record = self.get(kind, name)
        lock = FileLock(self._lock_path(kind, name))
        if not lock.try_acquire():
            raise BusyError(f"{kind} {name!r} is being written by process {lock.holder()}")
        try:
            trash = record.path.with_name(f".trash-{name}-{secrets.token_hex(4)}")
            os.rename(record.path, trash)
            with self.connect() as db:
                db.execute("DELETE FROM artifacts WHERE kind=? AND name=?", (kind, name))
            shutil.rmtree(trash)
        finally:
            lock.release()
        self.audit("remove", kind=kind, name=name)
        return record.path

    # -- writing ----------------------------------------------------------------------------
    def _lock_path(self, kind: str, name: str) -> Path:
        return self.root / ".locks" / f"{kind}-{name}.lock"

    def writer(self, kind: str, name: str, *, replace: bool = False) -> ArtifactWriter:
        return ArtifactWriter(self, kind, check_name(name), replace=replace)

    # -- audit log --------------------------------------------------------------------------
    def audit(self, event: str, **fields: Any) -> None:
        """Append a hash-chained line: each entry carries the sha256 of the previous line."""
        log = self.root / "audit.log"
        with blocking_lock(self.root / ".locks" / "audit.lock"):
            prev = "0" * 64
            if log.exists() and log.stat().st_size:
                prev = hashlib.sha256(_last_line(log)).hexdigest()
            entry = {"ts": manifest.now_iso(), "event": event, "prev": prev, **fields}
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


def _last_line(path: Path) -> bytes:
    """The last line of a file, however long, reading backwards in growing windows."""
    size = path.stat().st_size
    window = 4096
    with open(path, "rb") as fh:
        while True:
            start = max(0, size - window)
            fh.seek(start)
            lines = fh.read().rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                return lines[-1]
            window *= 4


class ArtifactWriter:
    """Write an artifact atomically: `with ws.writer("model", "x") as w: ...; w.commit(...)`.

    Files go into `w.path` (a hidden staging directory). `commit` hashes them into manifest.json
    and renames the directory into place. Leaving the block without committing (an exception, a
    cancel) removes the staging directory; a killed process leaves it behind hidden, and the next
    writer of that name removes it.
    """

    def __init__(self, ws: Workspace, kind: str, name: str, *, replace: bool = False) -> None:
        self.ws, self.kind, self.name, self.replace = ws, kind, name, replace
        self.final = ws.artifact_dir(kind, name)
        self.lock = FileLock(ws._lock_path(kind, name))
        self.path = self.final.with_name(f"{STAGING_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}")
        self.committed = False

    def __enter__(self) -> ArtifactWriter:
        self.ws.ensure()
        if not self.lock.try_acquire():
            raise BusyError(
                f"{self.kind} {self.name!r} is being written by another process "
                f"(pid {self.lock.holder()})",
                hint="wait for it to finish, or pick another name",
            )
        try:
            if self.final.exists() and not self.replace:
                raise ApplianceError(
                    f"{self.kind} {self.name!r} already exists at {self.final}",
                    title="Already exists",
                    hint=f"choose another --name, or remove it first "
                    f"(appliance {KIND_DIRS[self.kind]} rm {self.name})",
                )
            self._restore_trash()
            for stale in self.final.parent.glob(f"{STAGING_PREFIX}{self.name}-*"):
                if STAGING_RE.fullmatch(stale.name.removeprefix(STAGING_PREFIX + self.name)):
                    shutil.rmtree(stale, ignore_errors=True)  # a killed writer's; we hold its lock
            self.path.mkdir(parents=True)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _restore_trash(self) -> None:
        """A replace that died between its two renames (where the OS cannot swap atomically) left
        the artifact only in a trash directory: put it back (we hold the artifact's lock)."""
        if self.final.exists():
            return
        for trash in sorted(self.final.parent.glob(f".trash-{self.name}-*")):
            if (trash / manifest.MANIFEST).is_file():
                os.rename(trash, self.final)
                return

    def commit(self, **fields: Any) -> dict[str, Any]:
        return self.commit_manifest(manifest.build(self.path, kind=self.kind, name=self.name, **fields))

    def commit_manifest(self, data: dict[str, Any]) -> dict[str, Any]:
        """Write `data` as the manifest (its file table must already match the staged files) and put
        the artifact in place; an existing one is swapped out atomically where the OS allows."""
        manifest.write(self.path, data)
        fsync_dir(self.path)
        trash = None
        if self.final.exists():
            if exchange(self.path, self.final):
                trash = self.path
            else:
                trash = self.final.with_name(f".trash-{self.name}-{secrets.token_hex(4)}")
                os.rename(self.final, trash)
                os.rename(self.path, self.final)
        else:
            os.rename(self.path, self.final)
        fsync_dir(self.final.parent)
        self.committed = True
        self.ws.register(self.kind, self.final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.ws.audit("commit", kind=self.kind, name=self.name,
                      files=len(data["files"]), parents=data["parents"])
        return data

    def __exit__(self, *exc: object) -> None:
        try:
            if not self.committed:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.lock.release()


def parent_ref(record: ArtifactRecord) -> dict[str, str]:
    """How a child's manifest names a parent: kind, name, and the parent manifest's sha256."""
    return {"kind": record.kind, "name": record.name, "manifest_sha256": record.manifest_sha256}
