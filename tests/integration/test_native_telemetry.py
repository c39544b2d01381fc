"""No native library phones home. ONNX Runtime 1.31 on Linux starts Microsoft's 1DS telemetry in
native threads while a session lives: a device id and an event store under ~/.cache, then DNS
lookups of mobile.events.data.microsoft.com (found by `strace -f -k` under the full demo; Python's
socket guard cannot see native code). The offline guard's environment turns it off; this test holds
a real ONNX session open under `strace -f` with the appliance's environment and finds no connect()
beyond loopback and no files written under $HOME. The control (without that environment, inside a
network namespace so nothing can leave) shows the check would see the lookups."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import offline

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")]
HOLD_S = 25  # the uploader's first lookup came 5-20 s after the session started

SESSION = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
{{setup}}
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
session.run(None, {{"x": np.ones(1, dtype=np.float32)}})
time.sleep({HOLD_S})
"""


def _traced(tmp_path: Path, setup: str, env: dict[str, str],
            prefix: list[str]) -> tuple[list[str], list[Path]]:
    home = tmp_path / "home"
    home.mkdir()
    trace = tmp_path / "trace.txt"
    code = SESSION.replace("{setup}", setup)
    done = subprocess.run([*prefix, "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
                           sys.executable, "-c", code],
                          env={**env, "HOME": str(home)}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return offline.connects_beyond_loopback(trace.read_text()), sorted(home.rglob("*"))


# ONNX Runtime also stays quiet where one of these says "CI"; the control must not depend on the
# runner (onnxruntime's telemetry_environment.h lists them).
CI_VARIABLES = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL",
                "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR",
                "BITBUCKET_BUILD_NUMBER", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI", "ORT_RUNNING_UNIT_TESTS")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in offline.OFFLINE_ENV and k not in CI_VARIABLES}


def test_an_onnx_session_under_the_guard_makes_no_connection_and_writes_nothing(tmp_path: Path) -> None:
    connects, written = _traced(tmp_path, "from appliance import offline; offline.install()",
                                _clean_env(), [])
    assert connects == [] and written == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="the control runs in a network namespace (root)")
def test_the_control_without_the_guard_is_seen(tmp_path: Path) -> None:
    connects, written = _traced(tmp_path, "", _clean_env(), ["unshare", "-n"])
    assert connects, "no telemetry without the guard: this ONNX Runtime has none, the test proves nothing"
    assert any("htons(53)" in line for line in connects)
    assert any("onnxruntime" in str(p) for p in written)
