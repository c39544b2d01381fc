"""The training job on a CPU without native bf16 computes in fp32 and says so in its log; the run
records the dtype it used (the merge reads it)."""

from __future__ import annotations

import pytest

from appliance import api, cpus, jobs, manifest
from appliance.workspace import Workspace

pytestmark = pytest.mark.integration
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx fma avx2\n\n"
CONFIG = {"lora_r": 4, "lora_alpha": 8, "max_steps": 1, "batch_size": 2, "grad_accum": 1,
          "max_seq_len": 96, "warmup_steps": 1, "eval_every": 1, "save_every": 1, "seed": 3}


def test_auto_on_an_avx2_cpu_trains_in_fp32_and_logs_why(train_ws: Workspace,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "read_cpu", lambda path=cpus.CPUINFO: cpus.parse_cpuinfo(AVX2_ONLY))
    job = jobs.submit(train_ws, "train", {"model": "tiny", "dataset": "small", "config": CONFIG,
                                          "source": "test", "name": "fp32-run"})
    assert api.run(train_ws, job.id).state == "succeeded", jobs.get(train_ws, job.id).message
    logs = [e["message"] for e in jobs.read_events(train_ws, job.id) if e["type"] == "log"]
    said = [m for m in logs if m.startswith("compute dtype")]
    assert said == ["compute dtype fp32: this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag); "
                    f"bf16 would run {cpus.BF16_SLOWDOWN}"]
    loading = [e["label"] for e in jobs.read_events(train_ws, job.id)
               if e["type"] == "progress" and e.get("stage") == "load-model"]
    assert len(loading) == 1 and "compute float32" in loading[0]  # the loading line agrees
    run = train_ws.get("run", "fp32-run")
    assert manifest.read(run.path)["config"]["compute_dtype"] == "torch.float32"
