"""The `appliance` command's surface: help, version, doctor, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "APPLIANCE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    out = run("--help", home=tmp_path)
    assert out.returncode == 0
    for command in ("models", "data", "doctor", "demo", "tui"):
        assert command in out.stdout


def test_version(tmp_path: Path) -> None:
    assert run("--version", home=tmp_path).stdout.startswith("appliance ")


def test_doctor_reports_offline_and_missing(tmp_path: Path) -> None:
    out = run("doctor", "--json", home=tmp_path / "ws")
    report = json.loads(out.stdout)
    assert report["offline"]["guard_installed"] and report["offline"]["offline_env"]
    assert report["disk"]["workspace"] == str((tmp_path / "ws").resolve())
    assert report["disk"]["exists"] is False  # doctor does not create the workspace
    assert out.returncode == (1 if report["missing"] else 0)
    assert report["versions"]["torch"]
    assert isinstance(report["cpu"]["features"], list)


def test_doctor_names_a_missing_default_model_and_the_fix(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLIANCE_SHARE": str(tmp_path / "empty")}
    out = subprocess.run([sys.executable, "-m", "appliance", "--home", str(tmp_path), "doctor"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert "default model" in out.stdout and "make setup" in out.stdout


def test_import_needs_a_path_or_default(tmp_path: Path) -> None:
    out = run("models", "import", home=tmp_path)
    assert out.returncode == 2 and "--default" in out.stderr


def test_unknown_model_for_dataset_import_names_the_available_ones(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    out = run("data", "import", str(data), "--model", "nope", home=tmp_path / "ws")
    assert out.returncode == 4  # ExitCode.NOT_FOUND
    assert "no model named 'nope'" in out.stderr and "available models: none" in out.stderr
