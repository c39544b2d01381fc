"""The install's profile (full or edge), found without importing anything; `require_full`'s one
line; the kit an install came from, as the installer (`appliance/kit.py record`) leaves it; and
what `appliance doctor` says about them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import api, doctor, jobs, kit, profile, stages
from appliance.errors import InvalidRequest, RefusedError
from appliance.workspace import Workspace


def _only(monkeypatch: pytest.MonkeyPatch, missing: set[str], *, raises: bool = False) -> list[str]:
    """find_spec answers None (or raises, as it does for sys.modules[name] = None's parent) for
    `missing`; records every name asked."""
    asked: list[str] = []
    real = importlib.util.find_spec

    def fake(name: str, package: str | None = None) -> Any:
        asked.append(name)
        if name in missing:
            if raises:
                raise ValueError(f"{name}.__spec__ is None")
            return None
        return real("json") if name in profile.FULL_MODULES else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    monkeypatch.delenv(profile.OVERRIDE_ENV, raising=False)
    return asked


def test_full_when_torch_transformers_and_peft_are_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _only(monkeypatch, set())
    assert profile.current() == "full" and profile.is_full()
    assert set(profile.FULL_MODULES) <= set(asked)
    profile.require_full("training")  # no refusal


@pytest.mark.parametrize("missing", [{"torch"}, {"transformers"}, {"peft"}, {"torch", "transformers"}])
def test_edge_when_any_of_them_is_missing(monkeypatch: pytest.MonkeyPatch, missing: set[str]) -> None:
    _only(monkeypatch, missing)
    assert profile.current() == "edge"
    assert profile.missing_for_full() == [m for m in profile.FULL_MODULES if m in missing]


def test_a_find_spec_that_raises_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _only(monkeypatch, {"transformers"}, raises=True)
    assert profile.current() == "edge"


def test_detection_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in profile.FULL_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    profile.current()
    assert not set(profile.FULL_MODULES) & set(sys.modules)


def test_the_environment_can_force_edge_but_never_full(monkeypatch: pytest.MonkeyPatch) -> None:
    _only(monkeypatch, set())
    monkeypatch.setenv(profile.OVERRIDE_ENV, "edge")
    assert profile.current() == "edge"
    _only(monkeypatch, {"torch"})
    monkeypatch.setenv(profile.OVERRIDE_ENV, "full")
    assert profile.current() == "edge"


def test_require_full_refuses_on_edge_in_one_line_with_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _only(monkeypatch, {"torch", "transformers", "peft"})
    with pytest.raises(RefusedError) as err:
        profile.require_full("training")
    assert err.value.message == "training needs the full profile (this install is the edge profile)"
    assert "\n" not in err.value.message
    assert "make setup KIT=DIR" in (err.value.hint or "") and "install.sh" in (err.value.hint or "")


# -- the kit ------------------------------------------------------------------------------------
def _kit(tmp_path: Path, version: str, profile_name: str = "edge") -> Path:
    folder = tmp_path / f"kit-{version}"
    (folder / "wheels").mkdir(parents=True)
    (folder / "wheels" / "x.whl").write_bytes(b"x")
    kit.write_manifest(folder, profile=profile_name, target=kit.Target("3.11", "linux_x86_64", "cpu"),
                       version=version)
    return folder


def test_no_kit_reads_as_none(tmp_path: Path) -> None:
    assert profile.kit(tmp_path) is None and profile.kit_history(tmp_path) == []
    assert profile.previous_kit(tmp_path) is None


def test_the_kit_and_its_history_as_the_installer_records_them(tmp_path: Path) -> None:
    share = tmp_path / "share"
    kit.record(_kit(tmp_path, "0.1.0", "full"), share)
    first = profile.kit(share)
    assert first is not None and (first.appliance_version, first.profile) == ("0.1.0", "full")
    assert first.target == "Python 3.11 linux_x86_64 cpu" and first.created and first.installed
    assert profile.previous_kit(share) is None  # the only install is the current one
    kit.record(_kit(tmp_path, "0.2.0"), share, previous="0.1.0")
    now, before = profile.kit(share), profile.previous_kit(share)
    assert now is not None and (now.appliance_version, now.profile) == ("0.2.0", "edge")
    assert before is not None and (before.appliance_version, before.profile) == ("0.1.0", "full")
    assert [k.appliance_version for k in profile.kit_history(share)] == ["0.1.0", "0.2.0"]
    assert "appliance 0.2.0 edge kit" in now.describe()


def test_the_minimal_history_format_and_a_reinstall(tmp_path: Path) -> None:
    (tmp_path / "kit.json").write_text(json.dumps(
        {"appliance_version": "0.3.0", "profile": "edge", "installed": "t3"}))
    (tmp_path / "kit-history.json").write_text(json.dumps([
        {"appliance_version": "0.2.0", "profile": "full", "installed": "t1"},
        "not an entry",
        {"appliance_version": "0.3.0", "profile": "edge", "installed": "t2"},
        {"appliance_version": "0.3.0", "profile": "edge", "installed": "t3"}]))
    before = profile.previous_kit(tmp_path)
    assert before is not None and (before.appliance_version, before.installed) == ("0.2.0", "t1")


def test_a_previous_version_without_a_history(tmp_path: Path) -> None:
    (tmp_path / "kit.json").write_text(json.dumps(
        {"appliance_version": "0.3.0", "profile": "edge", "previous_version": "0.2.5"}))
    before = profile.previous_kit(tmp_path)
    assert before is not None and before.appliance_version == "0.2.5"


@pytest.mark.parametrize("text", ["{", "[]", '{"other": 1}', "\xff"])
def test_a_damaged_kit_file_reads_as_no_kit(tmp_path: Path, text: str) -> None:
    (tmp_path / "kit.json").write_text(text, encoding="latin-1")
    (tmp_path / "kit-history.json").write_text(text, encoding="latin-1")
    assert profile.kit(tmp_path) is None and profile.kit_history(tmp_path) == []


# -- appliance doctor ----------------------------------------------------------------------------
@pytest.fixture
def share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    share = tmp_path / "share"
    monkeypatch.setenv("APPLIANCE_SHARE", str(share))
    kit.record(_kit(tmp_path, "0.1.0", "full"), share)
    kit.record(_kit(tmp_path, "0.2.0"), share, previous="0.1.0")
    return share


def test_doctor_on_edge_names_the_profile_and_the_kit_and_wants_no_torch(
        share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _only(monkeypatch, {"torch", "transformers", "peft"})
    report = doctor.collect(Workspace(tmp_path / "ws"))
    lines: list[str] = []
    doctor.print_report(report, lines.append)
    text = "\n".join(lines)
    assert report["profile"]["profile"] == "edge"
    assert report["profile"]["kit"]["appliance_version"] == "0.2.0"
    missing = {m["what"] for m in report["missing"]}
    assert not missing & {"torch", "transformers", "peft", "GGUF converter"}, missing
    assert "profile     edge (serve and chat; training needs the full profile" in text
    assert "kit         appliance 0.2.0, edge profile, built " in text
    assert "for Python 3.11 linux_x86_64 cpu" in text
    assert "previous    appliance 0.1.0, full profile" in text
    json.dumps(report)  # --json


def test_doctor_on_full_checks_the_training_stack(share: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _only(monkeypatch, set())
    monkeypatch.setattr(doctor, "gpu_info", lambda: [])
    report = doctor.collect(Workspace(tmp_path / "ws"))
    lines: list[str] = []
    doctor.print_report(report, lines.append)
    assert report["profile"]["profile"] == "full"
    assert "GGUF converter" in {m["what"] for m in report["missing"]}  # this share has none
    assert lines[1] == "profile     full (training, export, serve and chat)"
    assert "(the kit was the edge profile; this install now reads as full)" in "\n".join(lines)


@pytest.mark.parametrize("kind", sorted(stages.FULL_PROFILE_KINDS))
def test_the_door_refuses_full_profile_kinds_on_an_edge_install(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(profile.OVERRIDE_ENV, "edge")
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(RefusedError, match="needs the full profile"):
        api.start(ws, kind, {})
    assert jobs.list_jobs(ws) == []  # nothing queued
    monkeypatch.delenv(profile.OVERRIDE_ENV)
    if profile.current() == profile.FULL:  # on a full install the same request reaches its checks
        with pytest.raises(InvalidRequest):
            api.start(ws, kind, {})
