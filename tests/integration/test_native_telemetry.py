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
from tests.tmpdirs import ModuleTemp

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


# onnxruntime-genai's generator (how the fp16 export is served on CUDA; its CPU provider here) logs
# through the same 1DS store: `onnxruntime-genai.db` under ~/.cache and DNS lookups beside
# onnxruntime's. `og.disable_telemetry_events()` alone did not stop them (measured under strace in a
# network namespace); onnxruntime's variables in the appliance's environment do. genai_lm calls both.
GENAI = """
import sys, time
sys.path.insert(0, {root!r})
{setup}
import onnxruntime_genai as og
config = og.Config({folder!r})
config.clear_providers()
model = og.Model(config)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64)
generator = og.Generator(model, params)
generator.append_tokens([1, 2, 3])
for _ in range(5):
    generator.generate_next_token()
time.sleep({hold})
"""


@pytest.fixture(scope="module")
def genai_folder(module_tmp: ModuleTemp, tiny_llama_source: Path) -> Path:
    pytest.importorskip("onnxruntime_genai")
    from export.onnx import export_onnx

    folder = module_tmp.mktemp("genai") / "fp16"
    export_onnx(tiny_llama_source, folder, "fp16")  # the export stage's fp16: genai's graph
    return folder


def _genai_traced(tmp_path: Path, folder: Path, setup: str, env: dict[str, str],
                  prefix: list[str]) -> tuple[list[str], list[Path]]:
    home = tmp_path / "home"
    home.mkdir()
    trace = tmp_path / "trace.txt"
    code = GENAI.format(root=str(Path(__file__).resolve().parents[2]), setup=setup, folder=str(folder),
                        hold=HOLD_S)
    done = subprocess.run([*prefix, "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
                           sys.executable, "-c", code],
                          env={**env, "HOME": str(home)}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return offline.connects_beyond_loopback(trace.read_text()), sorted(home.rglob("*"))


def test_a_genai_generator_under_the_guard_makes_no_connection_and_writes_nothing(
        tmp_path: Path, genai_folder: Path) -> None:
    connects, written = _genai_traced(tmp_path, genai_folder, "from appliance import offline; "
                                      "offline.install()", _clean_env(), [])
    assert connects == [] and written == []


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="the control runs in a network namespace (root)")
def test_the_genai_control_without_the_guard_is_seen(tmp_path: Path, genai_folder: Path) -> None:
    connects, written = _genai_traced(tmp_path, genai_folder, "", _clean_env(), ["unshare", "-n"])
    assert connects, "no telemetry without the guard: this genai has none, the test proves nothing"
    assert any("onnxruntime-genai" in str(p) for p in written)
