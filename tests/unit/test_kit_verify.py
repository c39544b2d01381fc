"""A kit is checked file by file before anything is installed: every kind of damage or
alteration is refused naming the file and the check (appliance/kit.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import kit

HERE = kit.Target.here()


def make_kit(root: Path, profile: str = "edge") -> Path:
    d = root / "kit"
    (d / "wheels").mkdir(parents=True)
    (d / "share" / "models").mkdir(parents=True)
    (d / "wheels" / "numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"wheel" * 100)
    (d / "wheels" / "appliance-0.1.0-py3-none-any.whl").write_bytes(b"appliance")
    (d / "share" / "models" / "model.gguf").write_bytes(bytes(range(256)) * 4)
    kit.write_manifest(d, profile=profile, target=HERE, version="0.1.0")
    return d


def test_an_intact_kit_verifies(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    manifest = kit.verify(d, profile="edge")
    assert set(manifest["files"]) == {"wheels/numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl",
                                      "wheels/appliance-0.1.0-py3-none-any.whl", "share/models/model.gguf"}
    assert "profile edge" in kit.describe(manifest)


def _refused(d: Path, path: str, check: str, **kw: object) -> None:
    with pytest.raises(kit.KitError) as info:
        kit.verify(d, **kw)  # type: ignore[arg-type]
    assert (info.value.path, info.value.check) == (path, check), str(info.value)


def test_a_changed_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    f = d / "share" / "models" / "model.gguf"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    _refused(d, "share/models/model.gguf", "sha256")


def test_a_truncated_file_is_refused_by_size(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    f = d / "wheels" / "appliance-0.1.0-py3-none-any.whl"
    f.write_bytes(f.read_bytes()[:-1])
    _refused(d, "wheels/appliance-0.1.0-py3-none-any.whl", "size")


def test_a_missing_wheel_is_refused(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    (d / "wheels" / "numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl").unlink()
    _refused(d, "wheels/numpy-2.4.6-cp311-cp311-manylinux_2_17_x86_64.whl", "missing")


def test_an_extra_file_is_refused(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    (d / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"x")
    _refused(d, "wheels/evil-1.0-py3-none-any.whl", "extra file")


def test_a_link_is_refused(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    (d / "wheels" / "link.whl").symlink_to("/etc/hostname")
    _refused(d, "wheels/link.whl", "file type")


def _edit_manifest(d: Path, **target: str) -> None:
    m = json.loads((d / kit.MANIFEST).read_text())
    m["target"].update(target)
    (d / kit.MANIFEST).write_text(json.dumps(m))


def test_a_kit_for_another_python_is_refused_before_hashing(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    _edit_manifest(d, python="3.12" if HERE.python != "3.12" else "3.13")
    (d / "share" / "models" / "model.gguf").write_bytes(b"changed too")  # not reached
    _refused(d, kit.MANIFEST, "python")


def test_a_kit_for_another_platform_or_profile_is_refused(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    _refused(d, kit.MANIFEST, "profile", profile="full")
    _edit_manifest(d, platform="macosx_14_0_arm64")
    _refused(d, kit.MANIFEST, "platform")


def test_a_folder_without_manifest_or_with_garbage_is_not_a_kit(tmp_path: Path) -> None:
    _refused(tmp_path / "nowhere", str(tmp_path / "nowhere"), "kit folder")
    _refused(tmp_path, str(tmp_path / kit.MANIFEST), "manifest")
    (tmp_path / kit.MANIFEST).write_text("[1, 2]")
    _refused(tmp_path, str(tmp_path / kit.MANIFEST), "manifest")


def test_a_manifest_path_outside_the_kit_is_refused(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    m = json.loads((d / kit.MANIFEST).read_text())
    m["files"]["../outside"] = {"size": 1, "sha256": "0" * 64}
    (d / kit.MANIFEST).write_text(json.dumps(m))
    _refused(d, "../outside", "path")


def test_the_verifier_runs_on_a_bare_python_and_says_nothing_was_installed(tmp_path: Path) -> None:
    """`python3 -I appliance/kit.py verify DIR`: isolated mode, no site-packages, no appliance."""
    d = make_kit(tmp_path)
    script = Path(kit.__file__)
    ok = subprocess.run([sys.executable, "-I", "-S", str(script), "verify", str(d)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "kit verified" in ok.stdout, ok.stderr
    (d / "wheels" / "extra.whl").write_bytes(b"x")
    bad = subprocess.run([sys.executable, "-I", "-S", str(script), "verify", str(d)],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "wheels/extra.whl: extra file" in bad.stderr and "nothing was installed" in bad.stderr


def test_the_cli_verifies_and_refuses_with_the_integrity_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance import cli

    d = make_kit(tmp_path)
    assert cli.main(["kit", "verify", str(d), "--profile", "edge"]) == 0
    assert "kit verified" in capsys.readouterr().out
    (d / "share" / "models" / "model.gguf").write_bytes(b"swapped")
    assert cli.main(["kit", "verify", str(d)]) == 5
    assert "share/models/model.gguf: size" in capsys.readouterr().err


def test_kit_build_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(kit.KitError) as info:
        kit.build(tmp_path, profile="edge", checkout=tmp_path, share=tmp_path, cache=tmp_path)
    assert info.value.check == "kit folder"


def test_install_records_the_kit_and_the_version_it_replaced(tmp_path: Path) -> None:
    d = make_kit(tmp_path)
    share = tmp_path / "share"
    kit.record(d, share)
    kit.record(d, share, previous="0.0.9")
    history = json.loads((share / "kit-history.json").read_text())
    assert [h["previous_version"] for h in history] == [None, "0.0.9"]
    assert json.loads((share / "kit.json").read_text())["profile"] == "edge"
