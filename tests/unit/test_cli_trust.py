"""The CLI of signing keys, trust, the audit trail and bundles, as an operator types it: a key made
on one box, its public key trusted on another, a bundle refused then imported, the audit trail
verified, tampered and exported for an auditor (checked with openssl where it is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import signing
from appliance.workspace import Workspace
from tests.unit.test_cli import run


def _export(home: Path) -> None:
    ws = Workspace(home).ensure()
    with ws.writer("export", "e1") as w:
        (w.path / "m.gguf").write_bytes(b"g" * 3000)
        w.commit(info={"summary": {"format": "gguf", "type": "Q8_0", "parity": "pass"}})


def test_keys_trust_and_a_bundle_between_two_boxes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _export(a)
    bundle = tmp_path / "e1.bundle"
    no_key = run("bundle", "create", "e1", "-o", str(bundle), home=a)
    assert no_key.returncode == 4 and "signing-key create" in no_key.stderr + no_key.stdout
    assert run("signing-key", "create", "boxa", home=a).returncode == 0
    keys = json.loads(run("signing-key", "list", "--json", home=a).stdout)
    assert [(k["name"], k["default"]) for k in keys] == [("boxa", True)]
    made = run("bundle", "create", "e1", "-o", str(bundle), home=a)
    assert made.returncode == 0, made.stderr
    refused = run("bundle", "import", str(bundle), home=b)
    assert refused.returncode == 7 and "not trust" in refused.stdout + refused.stderr
    verify = run("bundle", "verify", str(bundle), home=b)
    assert verify.returncode == 1 and "NOT trusted" in verify.stdout
    pub = tmp_path / "boxa.pub"
    assert run("signing-key", "export", "-o", str(pub), home=a).returncode == 0
    assert b"PRIVATE" not in pub.read_bytes()
    assert run("trust", "add", str(pub), "--name", "boxa", home=b).returncode == 0
    again = run("trust", "add", str(pub), "--name", "other", home=b)
    assert again.returncode == 5 and "already trusted" in again.stderr + again.stdout
    assert run("bundle", "import", str(bundle), home=b).returncode == 0
    listed = json.loads(run("bundle", "list", "--json", home=b).stdout)
    assert listed[0]["trusted_as"] == "boxa" and listed[0]["artifacts"] == ["e1"]
    assert run("trust", "remove", "boxa", home=b).returncode == 0
    actions = [e["event"] for e in json.loads(run("audit", "show", "--json", home=b).stdout)]
    assert actions == ["job-submit", "trust-add", "job-submit", "commit", "commit", "bundle-import",
                       "trust-remove"]  # the refused import left no commit, only its job


def test_a_private_key_leaves_only_encrypted(tmp_path: Path) -> None:
    home = tmp_path / "a"
    run("signing-key", "create", "boxa", home=home)
    bare = run("signing-key", "export", "--private", "-o", str(tmp_path / "k.pem"), home=home)
    assert bare.returncode == 2 and not (tmp_path / "k.pem").exists()
    phrase = tmp_path / "phrase"
    phrase.write_text("correct horse battery\n")
    out = run("signing-key", "export", "--private", "--passphrase-file", str(phrase),
              "-o", str(tmp_path / "k.pem"), home=home)
    assert out.returncode == 0, out.stderr
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "k.pem").read_bytes()
    refused = run("trust", "add", str(tmp_path / "k.pem"), "--name", "x", home=home)
    assert refused.returncode == 5 and "private key" in refused.stderr + refused.stdout


def test_audit_verify_export_and_tamper(tmp_path: Path) -> None:
    home = tmp_path / "a"
    _export(home)
    run("signing-key", "create", "boxa", home=home)
    ok = run("audit", "verify", home=home)
    assert ok.returncode == 0 and "audit log ok: 2 lines" in ok.stdout
    out = tmp_path / "trail.jsonl"
    assert run("audit", "export", str(out), home=home).returncode == 0
    pub = tmp_path / "boxa.pub"
    pub.write_bytes(signing.own_key(Workspace(home)).pem)
    checked = run("audit", "check-export", str(out), "--public-key", str(pub), home=home)
    assert checked.returncode == 0 and "signature valid" in checked.stdout
    if shutil.which("openssl"):  # the standard tool an auditor has
        done = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub), "-rawin",
                               "-in", f"{out}.head.json", "-sigfile", f"{out}.head.sig"],
                              capture_output=True, text=True)
        assert done.returncode == 0 and "Verified Successfully" in done.stdout
    trail = out.read_bytes()
    out.write_bytes(trail.replace(b'"commit"', b'"commix"', 1))
    bad = run("audit", "check-export", str(out), "--public-key", str(pub), home=home)
    assert bad.returncode == 5
    log = home / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"kind":"export"', b'"kind":"model"', 1))
    failed = run("audit", "verify", "--json", home=home)
    verdict = json.loads(failed.stdout)
    assert failed.returncode == 1 and verdict["findings"][0]["line"] == 1
    assert verdict["findings"][0]["check"] == "edited"


@pytest.mark.parametrize("command", [["bundle", "--help"], ["audit", "--help"], ["trust", "--help"]])
def test_the_groups_have_help(tmp_path: Path, command: list[str]) -> None:
    assert run(*command, home=tmp_path).returncode == 0


def test_trust_add_is_the_first_command_on_a_new_box(tmp_path: Path) -> None:
    run("signing-key", "create", "boxa", home=tmp_path / "a")
    pub = tmp_path / "boxa.pub"
    pub.write_bytes(signing.own_key(Workspace(tmp_path / "a")).pem)
    out = run("trust", "add", str(pub), "--name", "boxa", home=tmp_path / "new")
    assert out.returncode == 0, out.stderr
