"""The workspace: manifests, atomic writes, artifact writers under locks, the registry and the audit log."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import fsutil, manifest
from appliance.errors import ApplianceError, IntegrityError, NotFoundError, ValidationError
from appliance.workspace import Workspace, check_name

REPO = Path(__file__).resolve().parents[2]

# A writer process: argv = root, name, go-file. It writes a file into the staging dir, prints
# "ready", waits until the go-file exists, then commits. Errors (BusyError) propagate uncaught.
WRITER = """
import sys, time
from pathlib import Path
from appliance.workspace import Workspace
root, name, go = sys.argv[1:4]
with Workspace(Path(root)).writer("model", name) as w:
    (w.path / "weights.bin").write_bytes(name.encode() * 1000)
    print("ready", flush=True)
    deadline = time.monotonic() + 60  # never outlive a failed test by more than a minute
    while not Path(go).exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.01)
    w.commit()
"""


def spawn_writer(root: Path, name: str, go: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), name, str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        pytest.fail(f"writer did not get ready: {line!r}\n{proc.communicate(timeout=10)[1]}")


def make(ws: Workspace, name: str, files: dict[str, bytes], **fields: object) -> Path:
    with ws.writer("model", name) as w:
        for rel, data in files.items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_bytes(data)
        w.commit(**fields)
    return ws.artifact_dir("model", name)


# -- 1-2. manifest --------------------------------------------------------------------------------
def test_commit_writes_a_manifest_that_matches_the_bytes(workspace: Workspace) -> None:
    files = {"a.bin": os.urandom(3000), "sub/b.txt": b"hello\n"}
    parent = {"kind": "dataset", "name": "d", "manifest_sha256": "f" * 64}
    path = make(workspace, "m", files, parents=[parent], config={"lr": 0.001})

    data = json.loads((path / "manifest.json").read_text())
    assert (data["kind"], data["name"], data["parents"], data["config"]) == ("model", "m", [parent],
                                                                             {"lr": 0.001})
    assert data["files"] == {rel: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                             for rel, b in files.items()}
    assert data["versions"]["python"]
    assert manifest.verify(path) == data


@pytest.fixture
def artifact(workspace: Workspace) -> Path:
    return make(workspace, "m", {"a.bin": b"\x00" * 100, "b.bin": b"bbb"})


def test_a_flipped_byte_is_caught_by_full_verify_but_not_by_sizes_only(artifact: Path) -> None:
    data = bytearray((artifact / "a.bin").read_bytes())
    data[50] ^= 0xFF
    (artifact / "a.bin").write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=r"content changed \(sha256 mismatch\): a\.bin") as exc:
        manifest.verify(artifact, full=True)
    assert "b.bin" not in str(exc.value)
    assert manifest.verify(artifact, full=False)["name"] == "m"  # sizes only: documented blind spot


def test_missing_and_unexpected_files_are_named(artifact: Path) -> None:
    (artifact / "b.bin").unlink()
    (artifact / "extra.txt").write_text("surprise")
    with pytest.raises(IntegrityError) as exc:
        manifest.verify(artifact, full=False)
    assert "missing file: b.bin" in str(exc.value)
    assert "unexpected file: extra.txt" in str(exc.value)


def test_a_manifest_that_is_not_json_is_an_integrity_error(artifact: Path) -> None:
    (artifact / "manifest.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        manifest.verify(artifact)


# -- 3. atomic writes -----------------------------------------------------------------------------
def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    fsutil.atomic_write_text(target, "old")
    fsutil.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_failed_atomic_write_keeps_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.txt"
    fsutil.atomic_write_text(target, "old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


# -- 4-5. killed and concurrent writers (real processes) ------------------------------------------
def test_a_killed_writer_leaves_no_half_artifact(workspace: Workspace, tmp_path: Path) -> None:
    proc = spawn_writer(workspace.root, "m", tmp_path / "never")
    wait_ready(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    models = workspace.root / "models"
    assert workspace.list("model") == []
    assert not (models / "m").exists()
    assert [p.name for p in models.glob(".staging-m-*")]  # left behind, hidden

    make(workspace, "m", {"x.bin": b"x"})  # the lock was released by the kernel
    assert list(models.glob(".staging-m-*")) == []
    assert [r.name for r in workspace.list("model")] == ["m"]


def test_two_writers_of_one_name_one_commits_the_other_is_busy(workspace: Workspace, tmp_path: Path) -> None:
    go = tmp_path / "go"
    first = spawn_writer(workspace.root, "m", go)
    wait_ready(first)
    second = spawn_writer(workspace.root, "m", go)
    _, err2 = second.communicate(timeout=20)  # fails while the first holds the lock
    go.touch()
    _, err1 = first.communicate(timeout=20)

    assert first.returncode == 0, err1
    assert second.returncode == 1
    assert "appliance.errors.BusyError" in err2 and f"pid {first.pid}" in err2
    record = workspace.get("model", "m")
    assert manifest.verify(record.path)["files"]["weights.bin"]["size"] == 1000


def test_writers_of_different_names_run_concurrently(workspace: Workspace, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [spawn_writer(workspace.root, name, go) for name in ("alpha", "beta")]
    for proc in procs:
        wait_ready(proc)  # both hold their writer open at the same time
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=20) == 0, proc.communicate()[1]

    assert sorted(r.name for r in workspace.list("model")) == ["alpha", "beta"]
    with workspace.connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- 6. writer lifecycle ---------------------------------------------------------------------------
def test_an_exception_before_commit_removes_staging(workspace: Workspace) -> None:
    with pytest.raises(RuntimeError), workspace.writer("model", "m") as w:
        (w.path / "a.bin").write_bytes(b"a")
        raise RuntimeError("cancelled")
    assert os.listdir(workspace.root / "models") == []
    assert workspace.list("model") == []
    make(workspace, "m", {"a.bin": b"a"})  # the lock was released


def test_existing_name_needs_replace(workspace: Workspace) -> None:
    path = make(workspace, "m", {"a.bin": b"old"})
    before = workspace.get("model", "m").manifest_sha256
    with pytest.raises(ApplianceError) as exc, workspace.writer("model", "m"):
        pass
    assert exc.value.title == "Already exists"

    with workspace.writer("model", "m", replace=True) as w:
        (w.path / "c.bin").write_bytes(b"new")
        w.commit()
    assert set(manifest.verify(path)["files"]) == {"c.bin"}
    assert workspace.get("model", "m").manifest_sha256 != before
    assert sorted(p.name for p in (workspace.root / "models").iterdir()) == ["m"]  # no trash left


def test_a_writer_does_not_touch_the_staging_dir_of_a_name_sharing_its_prefix(workspace: Workspace) -> None:
    with workspace.writer("model", "m-2") as other:
        (other.path / "w.bin").write_bytes(b"weights")
        make(workspace, "m", {"a.bin": b"a"})
        assert set(other.commit()["files"]) == {"w.bin"}


# -- 7-8. registry ---------------------------------------------------------------------------------
def test_reconcile_follows_the_directories(workspace: Workspace) -> None:
    make(workspace, "gone", {"a.bin": b"a"})
    kept = make(workspace, "kept", {"a.bin": b"a"})
    shutil.rmtree(workspace.artifact_dir("model", "gone"))
    assert [r.name for r in workspace.list("model")] == ["kept"]

    with workspace.connect() as db:
        db.execute("DELETE FROM artifacts WHERE name='kept'")
    assert [(r.name, r.path) for r in workspace.list("model")] == [("kept", kept)]


def test_a_moved_workspace_lists_its_artifacts_at_once(workspace: Workspace, tmp_path: Path) -> None:
    make(workspace, "m", {"a.bin": b"a"})
    moved = Workspace(Path(shutil.move(workspace.root, tmp_path / "moved")))
    assert [(r.name, r.path) for r in moved.list("model")] == [("m", moved.root / "models" / "m")]


def test_remove_drops_directory_and_row(workspace: Workspace) -> None:
    path = make(workspace, "m", {"a.bin": b"a"})
    make(workspace, "n", {"a.bin": b"a"})
    assert workspace.remove("model", "m") == path
    assert sorted(os.listdir(workspace.root / "models")) == ["n"]
    with workspace.connect() as db:
        assert db.execute("SELECT name FROM artifacts").fetchall() == [("n",)]


def test_get_missing_lists_available_names(workspace: Workspace) -> None:
    for name in ("b1", "a1"):
        make(workspace, name, {"a.bin": b"a"})
    with pytest.raises(NotFoundError) as exc:
        workspace.get("model", "nope")
    assert exc.value.hint is not None and "a1" in exc.value.hint and "b1" in exc.value.hint


# -- 9. audit log ----------------------------------------------------------------------------------
def test_audit_log_is_hash_chained(workspace: Workspace) -> None:
    make(workspace, "m", {"a.bin": b"a"})
    make(workspace, "n", {"a.bin": b"a"})
    workspace.remove("model", "m")

    lines = (workspace.root / "audit.log").read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["event"], e["name"]) for e in entries] == [("commit", "m"), ("commit", "n"), ("remove", "m")]
    expected = ["0" * 64] + [hashlib.sha256(line).hexdigest() for line in lines[:-1]]
    assert [e["prev"] for e in entries] == expected


def test_audit_chain_holds_after_a_long_line(workspace: Workspace) -> None:
    workspace.ensure()
    workspace.audit("note", text="x" * 70_000)
    workspace.audit("note", text="short")
    first, second = (workspace.root / "audit.log").read_bytes().splitlines()
    assert json.loads(second)["prev"] == hashlib.sha256(first).hexdigest()


# -- 10. names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "", "a/b", "a" * 81, ".hidden", "-x"])
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(ValidationError):
        check_name(name)


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B_x", "a" * 80])
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name


def test_check_name_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValidationError):
        check_name("x\n")


# -- 11. a private workspace -----------------------------------------------------------------------
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): os.lstat(p).st_mode & 0o777 for p in [root, *root.rglob("*")]}


def _wide(modes: dict[str, int]) -> dict[str, str]:
    return {rel: oct(mode) for rel, mode in modes.items() if mode & 0o077}


def test_a_new_workspace_is_private(workspace: Workspace) -> None:
    make(workspace, "m", {"a.bin": b"a", "sub/b.txt": b"b"})
    workspace.audit("note", text="x")
    with workspace.connect() as db:  # while a connection is open the WAL and its index exist
        db.execute("SELECT count(*) FROM artifacts").fetchone()
        modes = _modes(workspace.root)
    assert {"appliance.db", "appliance.db-wal", "appliance.db-shm", "audit.log"} <= set(modes)
    assert _wide(modes) == {}
    assert modes["."] == modes["models"] == modes["models/m"] == 0o700
    assert modes["appliance.db"] == modes["audit.log"] == 0o600


def test_an_existing_workspace_is_tightened_when_opened(workspace: Workspace) -> None:
    make(workspace, "m", {"a.bin": b"a", "sub/b.txt": b"b"})
    for path in [workspace.root, *workspace.root.rglob("*")]:  # as an older version left it
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert _wide(_modes(workspace.root))

    Workspace(workspace.root).ensure()
    assert _wide(_modes(workspace.root)) == {}
    assert manifest.verify(workspace.get("model", "m").path)["name"] == "m"  # still readable
    make(workspace, "n", {"a.bin": b"a"})  # and writable
