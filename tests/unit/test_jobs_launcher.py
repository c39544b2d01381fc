"""APPLIANCE_JOB_LAUNCHER=systemd hands a job to `appliance-job@ID` through systemctl (a stand-in
systemctl on PATH records the call: there is no systemd in the test machine's session)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from appliance import jobs
from appliance.errors import ApplianceError
from appliance.workspace import Workspace


def _fake_systemctl(bin_dir: Path, code: int) -> Path:
    bin_dir.mkdir()
    log = bin_dir / "calls"
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "unit failed" >&2\nexit {code}\n')
    script.chmod(0o755)
    return log


def test_job_goes_to_its_unit(workspace: Workspace, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_systemctl(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("APPLIANCE_JOB_LAUNCHER", "systemd")
    job = jobs.start(workspace.ensure(), "selftest", {"steps": 1, "interval": 0.0})
    assert log.read_text().split() == ["start", "--no-block", f"appliance-job@{job.id}.service"]
    assert jobs.get(workspace, job.id).state == "queued"  # the unit's `jobs run` claims it


def test_a_unit_that_cannot_start_fails_the_job(workspace: Workspace, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_systemctl(tmp_path / "bin", 5)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("APPLIANCE_JOB_LAUNCHER", "systemd")
    with pytest.raises(ApplianceError, match="unit failed"):
        jobs.start(workspace.ensure(), "selftest", {"steps": 1, "interval": 0.0})
    (job,) = jobs.list_jobs(workspace)
    assert job.state == "failed" and "systemctl could not start" in job.message


def test_a_server_job_never_goes_into_the_network_less_unit(workspace: Workspace, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    log = _fake_systemctl(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("APPLIANCE_JOB_LAUNCHER", "systemd")
    job = jobs.submit(workspace.ensure(), "serve", {"artifacts": ["missing"], "port": 0})
    assert jobs.spawn(workspace, job.id) > 0  # a detached process of its own, not systemctl
    assert not log.exists()
    done = jobs.get(workspace, job.id)
    for _ in range(150):
        if done.state in jobs.TERMINAL:
            break
        time.sleep(0.2)
        done = jobs.get(workspace, job.id)
    assert done.state == "failed" and "missing" in done.message
