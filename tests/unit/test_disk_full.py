"""A full disk, simulated: every write path of the workspace (atomic writes, artifact writers, the
SQLite index, the audit log) ends in one DiskFullError, "disk full at PATH: free N MB", and leaves
nothing half-written. tests/integration/test_disk_full.py does the same on a real full filesystem."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from appliance import fsutil, manifest
from appliance.errors import DiskFullError
from appliance.runtime import keys
from appliance.workspace import Workspace

MESSAGE = r"disk full at .+: free \d+ MB"


def _enospc(*_: object, **__: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_atomic_write_on_a_full_disk_keeps_the_old_content(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    fsutil.atomic_write_text(target, "old")
    monkeypatch.setattr(fsutil.os, "fsync", _enospc)
    with pytest.raises(DiskFullError, match=MESSAGE) as err:
        fsutil.atomic_write_text(target, "new")
    assert str(tmp_path) in err.value.message and err.value.hint
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_jsonl_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil.os, "fsync", _enospc)
    with pytest.raises(DiskFullError, match=MESSAGE):
        fsutil.write_jsonl(tmp_path / "train.jsonl", [{"a": 1}])


def test_a_safetensors_write_on_a_full_disk_in_a_writer(workspace: Workspace) -> None:
    from safetensors import SafetensorError

    raw = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')
    with pytest.raises(DiskFullError, match=MESSAGE) as err, workspace.writer("model", "m") as w:
        (w.path / "config.json").write_text("{}")
        raise raw
    assert err.value.__cause__ is raw
    assert "model 'm'" in err.value.message
    assert os.listdir(workspace.root / "models") == []  # the partial files are gone
    assert workspace.list("model") == []


def test_an_oserror_in_a_writer_on_a_full_disk(workspace: Workspace) -> None:
    with pytest.raises(DiskFullError, match=MESSAGE), workspace.writer("dataset", "d"):
        _enospc()
    assert os.listdir(workspace.root / "datasets") == []


def test_other_errors_in_a_writer_are_left_alone(workspace: Workspace) -> None:
    with pytest.raises(OSError) as err, workspace.writer("model", "m"):
        raise OSError(errno.EACCES, "Permission denied")
    assert not isinstance(err.value, DiskFullError)


def test_the_database_full_is_a_disk_full_error(workspace: Workspace) -> None:
    workspace.ensure()
    with pytest.raises(DiskFullError, match=MESSAGE) as err, workspace.connect() as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages + 2}")  # SQLite's own SQLITE_FULL
        db.execute("CREATE TABLE filler(x BLOB)")
        for _ in range(10):
            db.execute("INSERT INTO filler VALUES (randomblob(8000))")
    assert isinstance(err.value.__cause__, sqlite3.OperationalError)
    assert "appliance.db" in err.value.message
    with workspace.connect() as db:  # nothing half-written
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_the_audit_log_on_a_full_disk_says_the_action_was_done(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace.ensure()
    workspace.audit("note", text="before")
    before = (workspace.root / "audit.log").read_bytes()
    monkeypatch.setattr(fsutil.os, "fsync", _enospc)
    with pytest.raises(DiskFullError, match=MESSAGE) as err:
        workspace.audit("key-revoke", id="abcd1234")
    assert "key-revoke" in err.value.message and "audit.log" in err.value.message
    assert (workspace.root / "audit.log").read_bytes() == before  # no half line breaks the chain


def test_a_key_that_cannot_be_audited_is_not_left_behind(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace.ensure()

    def full(event: str, **_: object) -> None:
        raise DiskFullError(f"disk full at {workspace.root / 'audit.log'}: free 0 MB")

    monkeypatch.setattr(workspace, "audit", full)
    with pytest.raises(DiskFullError, match="no key was created"):
        keys.create(workspace, "k")
    assert keys.list_keys(workspace) == []


def test_a_revocation_frees_the_reserve_when_the_disk_is_full(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    keys.create(workspace, "k")
    reserve = workspace.root / ".reserve"
    assert reserve.is_file() and reserve.stat().st_size > 0
    real_connect = Workspace.connect
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 0)

    def full_while_reserved(self: Workspace):  # the disk is full until the reserve is given up
        if reserve.exists():
            raise DiskFullError("disk full at x: free 0 MB")
        return real_connect(self)

    monkeypatch.setattr(Workspace, "connect", full_while_reserved)
    with pytest.raises(DiskFullError):
        keys.create(workspace, "other")  # only revocation may spend the reserve
    assert reserve.exists()
    info = keys.revoke(workspace, "k")
    assert info.revoked and not reserve.exists()


def test_a_revocation_that_landed_before_the_disk_filled_is_not_reported_missing(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first try commits, then SQLite fails on a full disk (its WAL index): the retry after the
    reserve was spent finds the key already revoked and says so, not "no active key"."""
    keys.create(workspace, "k")
    real_revoke_row = keys._revoke_row
    calls: list[int] = []

    def commits_then_full(ws: Workspace, name: str) -> keys.KeyInfo:
        calls.append(1)
        info = real_revoke_row(ws, name)
        if len(calls) == 1:
            raise DiskFullError("disk full at x: free 0 MB")
        return info

    monkeypatch.setattr(keys, "_revoke_row", commits_then_full)
    info = keys.revoke(workspace, "k")
    assert info.name == "k" and info.revoked and len(calls) == 2


def test_a_revocation_without_reserve_says_what_to_do(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    keys.create(workspace, "k")
    (workspace.root / ".reserve").unlink()
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 0)

    def full(self: Workspace):
        raise DiskFullError(f"disk full at {self.root}: free 0 MB")

    monkeypatch.setattr(Workspace, "connect", full)
    with pytest.raises(DiskFullError) as err:
        keys.revoke(workspace, "k")
    assert "stop the server" in str(err.value) and str(workspace.root) in str(err.value)


def test_a_model_copy_that_cannot_fit_is_refused_before_copying(
        workspace: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.stages.models import importer as models

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 1024)
    with pytest.raises(DiskFullError, match=r"disk full at .+: free 0 MB.*needs"):
        models.check_space(workspace, [folder / "model.safetensors"])
    assert manifest.MANIFEST == "manifest.json"
