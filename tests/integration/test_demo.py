"""`appliance demo` end to end on the real SmolLM2 (model copied in to skip its import): dataset
import, a short QLoRA run on the CPU as a detached job, perplexity before and after, the merge,
Q8_0 + Q4_K_M GGUF and int4 ONNX exports with the parity table, a two-turn chat with the fine-tuned
model and the command to serve it; then a second run that finds
everything done and verified."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import manifest
from appliance.workspace import ArtifactRecord, Workspace

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def demo(home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), "demo"],
                          capture_output=True, text=True, env=env, timeout=1500)


# The whole lifecycle twice: ~8 minutes on an idle 2-core box (train, merge, three exports with an
# importance matrix and their gates, eval, chat); a slower CPU or a shared one must not turn that
# into a failure (the suite's default per-test limit is 900 s). Speed is bench/'s business.
@pytest.mark.timeout(2400)
def test_demo_trains_and_is_idempotent(model_workspace: tuple[Workspace, ArtifactRecord],
                                       stop_jobs_after: Callable[[Workspace], Workspace]) -> None:
    ws, _ = model_workspace
    stop_jobs_after(ws)  # a demo cut short leaves no detached job running through the rest of the suite
    first = demo(ws.root)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "already imported" in first.stdout  # the model was copied in
    assert "step 16/16" in first.stdout and "eval at step 0" in first.stdout
    found = re.search(r"eval perplexity ([\d.]+) before -> ([\d.]+) after", first.stdout)
    assert found, first.stdout[-1500:]
    before, after = map(float, found.groups())
    assert after < before  # 16 steps on Dolly make the held-out split more likely
    run = ws.get("run", "demo-qlora")
    assert {p["name"] for p in manifest.verify(run.path)["parents"]} == {"smollm2-135m-instruct",
                                                                         "dolly-sample"}
    assert "parity on" in first.stdout
    for name in ("demo-qlora-gguf-q8_0", "demo-qlora-gguf-q4_k_m", "demo-qlora-onnx-int4"):
        record = ws.get("export", name)
        assert re.search(rf"^{name} .* (pass|FAIL)", first.stdout, re.M), first.stdout[-2500:]
        assert (record.path / "parity.json").exists()
        assert {p["name"] for p in manifest.verify(record.path)["parents"]} == {"demo-qlora-merged"}
    chat = re.findall(r"assistant> (.*)\n(?:.*\n)*?\s+\((\d+) tokens, (stop|length)\)", first.stdout)
    assert len(chat) == 2 and all(answer.strip() and int(n) > 0 for answer, n, _ in chat), \
        first.stdout[-2500:]
    assert "serve demo-qlora-gguf-q8_0" in first.stdout
    assert re.search(r"^\s*demo-qlora-gguf-q8_0 +[\d.]+ \([+-][\d.]+\)", first.stdout, re.M), \
        first.stdout[-2500:]  # the before/after table: the GGUF's perplexity with its delta to the base
    assert (ws.get("eval", "demo-eval").path / "report.md").is_file()
    second = demo(ws.root)
    assert second.returncode == 0
    assert "run 'demo-qlora' already trained" in second.stdout and "step 1/" not in second.stdout
    assert "already exported" in second.stdout and "parity on" in second.stdout
    assert "eval 'demo-eval' already evaluated" in second.stdout
