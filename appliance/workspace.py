"""The workspace: one directory (APPLIANCE_HOME) holding every artifact, an SQLite index and an
audit log.

    models/<name>/     datasets/<name>/     runs/<id>/     exports/<id>/     bundles/     evals/<name>/
    appliance.db       (SQLite, WAL: the registry index and, later, jobs)
    audit.log          (append-only, hash-chained)

The directories are the truth; the database is an index rebuilt from manifests when they disagree
(`reconcile`). Artifacts are written by `ArtifactWriter`: into a hidden staging directory under a
per-artifact lock, then renamed into place with their manifest, so a half-written artifact is never
visible and two processes never write the same one.

The workspace is private to its owner (it holds models, data and the API keys' hashes): 0700
directories, 0600 files (the database, its WAL and index, the audit log, every artifact file), so
nothing copied into it (a model folder's files) is readable by anyone else. `ensure` tightens a
workspace an older version left wider, once.

A full disk is translated here, once for every command: inside an artifact writer, in the database
connection and in the audit log it becomes one DiskFullError, "disk full at PATH: free N MB".
`.reserve` is a small file kept while there is room; revoking an API key may spend it
(`spend_reserve`), so a revocation still works when the disk has filled up.
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
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from appliance import audit, cancellation, fsutil, manifest
from appliance.errors import (
    AlreadyExistsError,
    ApplianceError,
    BusyError,
    DiskFullError,
    IntegrityError,
    NotFoundError,
    RefusedError,
    ValidationError,
)
from appliance.fsutil import (
    FileLock,
    blocking_lock,
    disk_full_as_error,
    disk_full_error,
    exchange,
    fsync_dir,
    is_disk_full,
    make_private,
)

T = TypeVar("T")

KIND_DIRS = {"model": "models", "dataset": "datasets", "run": "runs", "export": "exports",
             "bundle": "bundles", "eval": "evals"}
# The CLI group whose `rm NAME --yes` removes an artifact of a kind (a bundle's import is undone
# by removing the exports it brought: bundles have no rm of their own)
RM_COMMAND = {"model": "models", "dataset": "data", "run": "runs", "export": "exports", "eval": "evals"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
STAGING_PREFIX = ".staging-"
STAGING_RE = re.compile(r"-\d+-[0-9a-f]{8}")  # what follows ".staging-<name>": -<pid>-<hex>
DB = "appliance.db"
# What the workspace itself creates at its root: the only entries `ensure` changes modes of (a
# workspace set up in a directory that also holds other things leaves those alone).
OWN_DIRS = (*KIND_DIRS.values(), ".locks", ".secrets", "jobs")
OWN_FILES = (DB, f"{DB}-wal", f"{DB}-shm", f"{DB}-journal", "audit.log", ".reserve")
RESERVE = ".reserve"
RESERVE_BYTES = 2 * 2**20  # a key revocation needs a few database pages, SQLite's 32 KiB index, a log line
RESERVE_MIN_FREE = 32 * 2**20  # the reserve is (re)made only while this much is free
LOW_FREE = 8 * 2**20  # below this, a write error ("disk I/O error") is taken as a full disk

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


def name_problem(name: str, what: str = "name") -> str | None:
    """What `check_name` would refuse `name` for, as one line (a request's field message), or None."""
    try:
        check_name(name, what)
    except ValidationError as exc:
        return f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    return None


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


def job_dir(ws: Workspace, job_id: str) -> Path:
    """Where a job keeps its log, events and checkpoints (`jobs/<id>/`)."""
    return ws.root / "jobs" / job_id


class Workspace:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_home()).expanduser().resolve()

    # -- layout -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "appliance.db").exists()

    def ensure(self) -> Workspace:
        with disk_full_as_error(self.root, "creating the workspace's folders"):
            fresh = not self.root.exists()
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._make_private(own_root=fresh or (self.root / DB).exists())
            for sub in KIND_DIRS.values():
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
            (self.root / ".locks").mkdir(mode=0o700, exist_ok=True)
        # Switching to WAL needs an exclusive lock that SQLite's busy handler does not wait for,
        # so creating the database is serialised between processes (WAL then persists in the file).
        with blocking_lock(self.root / ".locks" / "db.lock"), self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA_SQL)
        self._keep_reserve()
        return self

    def _make_private(self, *, own_root: bool) -> None:
        """0700/0600 for the root (once it is a workspace: created here, or holding the database)
        and for what the workspace made in it. Those are walked to the bottom only while the root
        is still wider than 0700 (a workspace from before this rule, tightened once); after that,
        the root's own mode keeps everyone else out, and new files are made private."""
        try:
            wide = bool(stat.S_IMODE(self.root.stat().st_mode) & 0o077)
        except OSError:
            return
        for name in (*OWN_DIRS, *OWN_FILES):
            path = self.root / name
            if path.exists():
                make_private(path, recursive=own_root and wide)
        if own_root:
            make_private(self.root, recursive=False)

    # -- the reserve ------------------------------------------------------------------------------
    def _keep_reserve(self) -> None:
        """Make `.reserve` while there is plenty of room (never on a filling disk)."""
        path = self.root / RESERVE
        if path.exists() or fsutil.free_bytes(self.root) < RESERVE_MIN_FREE:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return  # another process made it, or the root is not writable
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            with contextlib.suppress(OSError):
                os.write(fd, bytes(RESERVE_BYTES))
        finally:
            os.close(fd)

    def spend_reserve(self) -> bool:
        """Delete `.reserve` to give its space to an operation that must not fail on a full disk;
        False if there was none. It comes back once the disk has room again."""
        try:
            (self.root / RESERVE).unlink()
        except FileNotFoundError:
            return False
        return True

    def even_when_full(self, operation: Callable[[], T], *, hint: str) -> T:
        """Run `operation`; if the disk is full, spend the reserve and run it once more. A full disk
        with no reserve left is a DiskFullError whose hint is `hint` (what to do meanwhile)."""
        try:
            return operation()
        except DiskFullError as first:
            if not self.spend_reserve():
                raise DiskFullError(first.message, hint=hint) from first
        try:
            return operation()
        except DiskFullError as second:
            raise DiskFullError(second.message, hint=hint) from second

    def kind_dir(self, kind: str) -> Path:
        if kind not in KIND_DIRS:
            raise ValidationError(f"unknown artifact kind {kind!r}; known: {', '.join(KIND_DIRS)}")
        return self.root / KIND_DIRS[kind]

    def artifact_dir(self, kind: str, name: str) -> Path:
        return self.kind_dir(kind) / check_name(name)

    # -- database ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection to the workspace database. It is created 0600 (SQLite gives its WAL and
        index files the same mode); a full disk, in here or in the caller's block, is one
        DiskFullError (SQLite needs room even to read: its shared-memory index is a file)."""
        path = self.root / DB
        with self._database_errors(path):
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not path.exists():
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            with self._database_errors(path):
                db.execute("PRAGMA busy_timeout=30000")
                db.execute("PRAGMA synchronous=NORMAL")
                yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _database_errors(self, path: Path) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, OSError) as exc:
            name = str(getattr(exc, "sqlite_errorname", ""))
            low = name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")) and \
                0 <= fsutil.free_bytes(path) < LOW_FREE
            if not (is_disk_full(exc) or low):
                raise
            raise disk_full_error(path, "the workspace database needs room for its journal, "
                                  "even to read") from exc

    def _upsert(self, db: sqlite3.Connection, kind: str, path: Path, data: dict[str, Any]) -> None:
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
        """Append a keyed, hash-chained line (appliance/audit.py says how it is checked)."""
        audit.append(self.root, self.connect, event, fields)


class ArtifactWriter:
    """Write an artifact atomically: `with ws.writer("model", "x") as w: ...; w.commit(...)`.

    Files go into `w.path` (a hidden staging directory, 0700). `commit` makes them private (no
    group or other bits), hashes them into manifest.json and renames the directory into place.
    Leaving the block without committing (an exception, a cancel) removes the staging directory; a
    killed process leaves it behind hidden, and the next writer of that name removes it
    (`appliance doctor` lists such leftovers). An error that means the disk is full (whatever the
    library that hit it) leaves the block as one DiskFullError.
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
                raise AlreadyExistsError(
                    f"{self.kind} {self.name!r} already exists at {self.final}",
                    hint="choose another --name" + (
                        f", or remove it first (appliance {RM_COMMAND[self.kind]} rm {self.name} --yes)"
                        if self.kind in RM_COMMAND else ""),
                )
            self._restore_trash()
            for stale in self.final.parent.glob(f"{STAGING_PREFIX}{self.name}-*"):
                if STAGING_RE.fullmatch(stale.name.removeprefix(STAGING_PREFIX + self.name)):
                    shutil.rmtree(stale, ignore_errors=True)  # a killed writer's; we hold its lock
            with disk_full_as_error(self.final.parent, f"starting to write {self.kind} {self.name!r}"):
                self.path.mkdir(mode=0o700)
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
        with cancellation.deferred():  # a cancel must not land between the rename and the index
            make_private(self.path)
            manifest.write(self.path, data)
            return self._publish(data)

    def commit_as_staged(self) -> dict[str, Any]:
        """Put the artifact in place with the manifest already staged, byte for byte (a bundle
        import: the manifest's sha256 is the artifact's identity in its children and bundles)."""
        with cancellation.deferred():
            make_private(self.path)
            return self._publish(manifest.read(self.path))

    def _publish(self, data: dict[str, Any]) -> dict[str, Any]:
        """Rename the staged directory into place (swapping out an existing one), index it,
        and record the commit. The caller holds `cancellation.deferred()`."""
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        full = exc is not None and not self.committed and self._disk_full(exc)
        try:
            if not self.committed:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.lock.release()
        if full:
            raise disk_full_error(self.final.parent, f"writing {self.kind} {self.name!r}; its "
                                  "partial files were removed") from exc

    def _disk_full(self, exc: BaseException) -> bool:
        """An error that says the disk is full, or a write error (torch's "file write failed"
        names no cause) while the staging directory's disk has next to no room left."""
        if isinstance(exc, ApplianceError):
            return False
        if is_disk_full(exc):
            return True
        return isinstance(exc, OSError | RuntimeError) and 0 <= fsutil.free_bytes(self.path) < LOW_FREE


def ancestors(ws: Workspace, parents: list[dict[str, Any]]
              ) -> Iterator[tuple[dict[str, Any], ArtifactRecord | None, dict[str, Any] | None]]:
    """Walk a lineage breadth-first from `parents` (manifest parent refs), each artifact once:
    (its ref, its record and manifest, or None, None where this workspace no longer has it or
    its kind is unknown). What licences and bundles both follow."""
    todo, seen = list(parents), set()
    while todo:
        ref = todo.pop(0)
        key = (str(ref.get("kind")), str(ref.get("name")))
        if key in seen:
            continue
        seen.add(key)
        try:
            record = ws.get(*key)
            data = manifest.read(record.path)
        except (NotFoundError, ValidationError, IntegrityError):
            yield ref, None, None
            continue
        yield ref, record, data
        todo += data.get("parents", [])


def parent_ref(record: ArtifactRecord) -> dict[str, str]:
    """How a child's manifest names a parent: kind, name, and the parent manifest's sha256."""
    return {"kind": record.kind, "name": record.name, "manifest_sha256": record.manifest_sha256}


def require_passed(record: ArtifactRecord, *, override: bool = False) -> None:
    """What bundling and serving call: a failed parity gate stops them unless overridden."""
    if record.status == "failed" and not override:
        raise RefusedError(f"export {record.name!r} failed its parity gate "
                           f"({record.summary.get('parity', 'see parity.json')})",
                           hint="look at its parity.json (appliance exports show); pass "
                                "--allow-failed-parity to use it anyway")
