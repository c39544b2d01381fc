"""A genuinely full filesystem (a tmpfs of 64 MB in a private mount namespace, `unshare -rm`, no
root needed where unprivileged user namespaces are allowed): every command that must write says
"disk full at PATH: free N MB" and exits with DISK_FULL instead of a traceback, a key revocation
still goes through (the workspace's reserve), and nothing is left corrupted or half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ExitCode
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, os, sqlite3, subprocess, sys
from pathlib import Path
mnt, tiny, data = map(Path, sys.argv[1:4])
home = mnt / "ws"
sys.path.insert(0, sys.argv[4])
from appliance.stages.models import importer as models
from appliance.runtime import keys
from appliance.workspace import Workspace

def cli(*args):
    p = subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), *args],
                       capture_output=True, text=True, timeout=300)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr}

ws = Workspace(home)
models.import_path(ws, tiny, name="tiny")
keys.create(ws, "a")
keys.create(ws, "b")
out = {"reserve": (home / ".reserve").is_file()}

def fill(name):
    with open(mnt / name, "ab", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            return exc.errno

(mnt / "slack").write_bytes(b"\0" * (1 << 20))
out["fill_errno"] = fill("filler")
out["free"] = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
out["key_c"] = cli("keys", "create", "c")
out["data"] = cli("data", "import", str(data), "--model", "tiny", "--name", "d")
out["model"] = cli("models", "import", str(tiny), "--name", "tiny2")
(mnt / "slack").unlink()  # 1 MiB: the writer starts, the 4 MiB tensor does not fit
import torch
from safetensors.torch import save_file
try:
    with ws.writer("model", "st") as w:
        save_file({"x": torch.zeros(1 << 20)}, str(w.path / "model.safetensors"))
    out["safetensors"] = "no error"
except Exception as exc:
    out["safetensors"] = f"{type(exc).__name__}: {exc} <- {type(exc.__cause__).__name__}"
fill("filler")
out["revoke_a"] = cli("keys", "revoke", "a")  # spends the reserve
fill("filler")  # what the revocation gave back is taken again
out["revoke_b"] = cli("keys", "revoke", "b")
os.unlink(mnt / "filler")
out["keys"] = cli("keys", "list", "--json")
out["verify"] = cli("models", "show", "tiny", "--verify")
out["models"] = cli("models", "list", "--json")
out["datasets"] = cli("data", "list", "--json")
with sqlite3.connect(home / "appliance.db") as db:
    out["integrity"] = db.execute("PRAGMA integrity_check").fetchone()[0]
out["hidden"] = sorted(p.name for sub in ("models", "datasets") for p in (home / sub).iterdir()
                       if p.name.startswith("."))
out["audit"] = (home / "audit.log").read_text()
print("RESULT " + json.dumps(out))
'''


def _namespace_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return ("this box does not allow an unprivileged mount namespace with a tmpfs "
                f"(unshare -rm: {probe.stderr.strip()})")
    return None


@pytest.fixture(scope="module")
def full_disk_run(module_tmp: ModuleTemp, tiny_llama_source: Path) -> dict:
    reason = _namespace_works()
    if reason:
        pytest.skip(reason)
    from appliance.demo import sample_dataset

    base = module_tmp.mktemp("full")
    mnt = base / "mnt"
    mnt.mkdir()
    data = base / "d.jsonl"
    data.write_text("\n".join(sample_dataset().read_text().splitlines()[:10]) + "\n")
    (base / "script.py").write_text(SCRIPT)
    command = (f"mount -t tmpfs -o size=64m tmpfs {mnt} && exec {sys.executable} "
               f"{base / 'script.py'} {mnt} {tiny_llama_source} {data} {ROOT}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _disk_full(result: dict) -> str:
    assert result["rc"] == ExitCode.DISK_FULL, result
    assert "Traceback" not in result["err"]
    assert "disk full at " in result["err"] and " MB" in result["err"]
    return result["err"]


def test_the_filesystem_was_really_full(full_disk_run: dict) -> None:
    assert full_disk_run["fill_errno"] == 28 and full_disk_run["free"] == 0
    assert full_disk_run["reserve"] is True


def test_each_command_says_disk_full(full_disk_run: dict) -> None:
    for step in ("key_c", "data", "model"):
        _disk_full(full_disk_run[step])
    assert "free 0 MB" in full_disk_run["key_c"]["err"]


def test_a_safetensors_write_becomes_one_disk_full_error(full_disk_run: dict) -> None:
    assert full_disk_run["safetensors"].startswith("DiskFullError: disk full at ")
    assert full_disk_run["safetensors"].endswith("<- SafetensorError")


def test_a_revocation_goes_through_then_says_how(full_disk_run: dict) -> None:
    assert full_disk_run["revoke_a"]["rc"] == 0, full_disk_run["revoke_a"]
    err = _disk_full(full_disk_run["revoke_b"])
    assert "stop the server" in err


def test_nothing_was_corrupted_or_left_half_written(full_disk_run: dict) -> None:
    run = full_disk_run
    listed = {k["name"]: k for k in json.loads(run["keys"]["out"])}
    assert set(listed) == {"a", "b"}
    assert listed["a"]["revoked"] and not listed["b"]["revoked"]
    assert run["verify"]["rc"] == 0 and run["integrity"] == "ok"
    assert [m["name"] for m in json.loads(run["models"]["out"])] == ["tiny"]
    assert json.loads(run["datasets"]["out"]) == []
    assert run["hidden"] == []
    events = [json.loads(line)["event"] for line in run["audit"].splitlines()]
    assert events.count("key-revoke") == 1 and events.count("key-create") == 2
