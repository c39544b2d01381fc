"""API keys: shown once, stored hashed, checked in constant time, revoked without a restart."""

from __future__ import annotations

import sqlite3

import pytest

from appliance.errors import ApplianceError, NotFoundError, ValidationError
from appliance.runtime import keys
from appliance.workspace import Workspace


def test_key_is_stored_only_as_its_hash(workspace: Workspace) -> None:
    key = keys.create(workspace, "alice")
    assert keys.KEY_RE.fullmatch(key)
    db = sqlite3.connect(workspace.root / "appliance.db")
    rows = db.execute("SELECT * FROM api_keys").fetchall()
    db.close()
    assert len(rows) == 1 and key not in repr(rows) and key.split("_")[2] not in repr(rows)
    assert (workspace.root / "audit.log").read_text().count("key-create") == 1
    assert key not in (workspace.root / "audit.log").read_text()


def test_checker_accepts_only_active_exact_keys(workspace: Workspace) -> None:
    key = keys.create(workspace, "bob")
    checker = keys.KeyChecker(workspace)
    assert checker.name_of(key) == "bob"
    assert checker.name_of(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # one char off
    assert checker.name_of(None) is None and checker.name_of("") is None
    assert checker.name_of("Bearer " + key) is None
    keys.revoke(workspace, "bob")
    assert checker.name_of(key) is None  # the same checker sees the revocation


def test_names_are_checked_and_unique_while_active(workspace: Workspace) -> None:
    keys.create(workspace, "ci")
    with pytest.raises(ApplianceError, match="active key named 'ci'"):
        keys.create(workspace, "ci")
    keys.revoke(workspace, "ci")
    keys.create(workspace, "ci")  # the name is free again once revoked
    assert [k.revoked is None for k in keys.list_keys(workspace)] == [False, True]
    with pytest.raises(ValidationError, match="not allowed"):
        keys.create(workspace, "two words")
    with pytest.raises(NotFoundError, match="no active key"):
        keys.revoke(workspace, "nobody")


def test_cli_create_list_revoke(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    assert main(["--home", str(workspace.root), "keys", "create", "ops"]) == 0
    key = capsys.readouterr().out.strip()
    assert keys.KEY_RE.fullmatch(key)
    assert main(["--home", str(workspace.root), "keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "ops" in listed and "active" in listed and key not in listed
    assert main(["--home", str(workspace.root), "keys", "revoke", "ops"]) == 0
    assert main(["--home", str(workspace.root), "keys", "revoke", "ops"]) == 4
