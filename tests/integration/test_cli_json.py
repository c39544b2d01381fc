"""The scripted path for real: `train --follow --json`, `export --json`, `merge --json` and
`verify --json` on the tiny Llama through the `appliance` command, real jobs and runtimes. Stdout
must be one JSON document; the exit code says how it ended (0, 6 for a failed parity gate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import ExitCode
from appliance.workspace import Workspace

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["lora_r=4", "lora_alpha=8", "max_steps=2", "batch_size=2", "grad_accum=1", "max_seq_len=192",
         "warmup_steps=1", "eval_every=2", "save_every=2", "eval_batches=1", "seed=1"]


def appliance(ws: Workspace, *args: str) -> tuple[int, Any, str]:
    """Exit code, stdout parsed as JSON (it must parse), stderr."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "appliance", "--home", str(ws.root), *args],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": path})
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not one JSON document (rc {out.returncode}):\n{out.stdout[-3000:]}\n"
                    f"stderr:\n{out.stderr[-3000:]}")
    return out.returncode, doc, out.stderr


def test_train_export_merge_verify_as_json(train_ws: Workspace,
                                           stop_jobs_after: Callable[[Workspace], Workspace]) -> None:
    ws = stop_jobs_after(train_ws)
    sets = [a for s in TRAIN for a in ("--set", s)]
    code, doc, err = appliance(ws, "train", "--model", "tiny", "--dataset", "small", *sets,
                               "--follow", "--json")
    assert code == 0, err[-3000:]
    assert doc["job"]["state"] == "succeeded" and doc["job"]["kind"] == "train"
    assert doc["run"]["name"] == "tiny-small" and doc["run"]["steps"] == 2
    assert "step 2/2" in err  # the progress went to stderr

    code, doc, err = appliance(ws, "export", "gguf", "tiny-small", "--quant", "F16", "--json")
    assert code == 0, err[-3000:]
    (export,) = doc["exports"]
    assert doc["passed"] is True and export["name"] == "tiny-small-gguf-f16"
    assert export["status"] == "ready" and export["parity"]["artifacts"][0]["passed"] is True

    code, doc, err = appliance(ws, "merge", "tiny-small", "--json")  # made by the export: found
    assert code == 0 and doc["export"]["name"] == "tiny-small-merged", err[-3000:]

    code, doc, err = appliance(ws, "verify", "tiny-small-gguf-f16", "--json")
    assert code == 0 and doc["passed"] is True, err[-3000:]
    assert "verdict for tiny-small-gguf-f16: PASSED" in err

    code, doc, err = appliance(ws, "verify", "tiny-small-gguf-f16", "--threshold", "kl=0",
                               "--threshold", "ppl_increase=0", "--json")  # no loss at all: unmet
    assert code == ExitCode.PARITY_FAILED and doc["passed"] is False, err[-3000:]
    assert "FAILED" in err and "KL at most 0," in err, err[-3000:]
    refused = subprocess.run([sys.executable, "-m", "appliance", "--home", str(ws.root), "verify",
                              "tiny-small-gguf-f16", "--threshold", "agreement=1.5"],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert refused.returncode == ExitCode.INVALID, refused.stderr  # refused at the door, no job
    assert "agreement: must be between 0 and 1, got 1.5" in refused.stderr
    code, listed, _ = appliance(ws, "exports", "list", "--json")
    assert {e["name"]: e["status"] for e in listed}["tiny-small-gguf-f16"] == "failed"
