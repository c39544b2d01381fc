"""The training job on a CUDA GPU: bf16 (or fp16 on a T4) compute, NF4 base, paged 8-bit AdamW,
kill -9 + resume. Skipped without CUDA (CI has none): run on a GPU host with
`python -m pytest tests/gpu -q -s`. Prints its figures (tokens/s, peak GPU memory)."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.tmpdirs import ModuleTemp

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (none found)", allow_module_level=True)

from appliance import api, jobs  # noqa: E402
from appliance.demo import sample_dataset  # noqa: E402
from appliance.progress import is_staged  # noqa: E402
from appliance.stages.datasets import importer as datasets  # noqa: E402
from appliance.stages.models import importer as models  # noqa: E402
from appliance.workspace import Workspace  # noqa: E402
from tests.conftest import build_random_llama  # noqa: E402

pytestmark = pytest.mark.gpu
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192}
CONFIG = {"lora_r": 16, "lora_alpha": 32, "max_steps": 24, "batch_size": 8, "grad_accum": 1,
          "max_seq_len": 512, "warmup_steps": 2, "eval_every": 12, "save_every": 4, "seed": 1}


@pytest.fixture(scope="module")
def gpu_ws(module_tmp: ModuleTemp) -> Workspace:
    root = module_tmp.mktemp("gpu")
    ws = Workspace(root / "ws")
    folder = build_random_llama(root / "smol-shape", **SMOLLM2_SHAPE)
    model = models.import_path(ws, folder, name="smol-shape")
    datasets.import_file(ws, sample_dataset(), model, name="dolly")
    return ws


def params(name: str) -> dict:
    return {"model": "smol-shape", "dataset": "dolly", "config": CONFIG, "source": "gpu-test",
            "name": name}


def progress(ws: Workspace, job_id: str) -> dict[int, dict]:
    return {e["step"]: e for e in jobs.read_events(ws, job_id)
            if e["type"] == "progress" and not is_staged(e)}  # the steps, not the job's stages


def report(line: str) -> None:
    print(line)
    if out := os.environ.get("APPLIANCE_BENCH_OUT"):
        with open(Path(out) / "gpu-train.txt", "a") as fh:
            fh.write(line + "\n")


def test_training_runs_on_the_gpu(gpu_ws: Workspace) -> None:
    job = jobs.submit(gpu_ws, "train", params("gpu-run"))
    done = api.run(gpu_ws, job.id)
    assert done.state == "succeeded", done.message
    config = json.loads((gpu_ws.get("run", "gpu-run").path / "manifest.json").read_text())["config"]
    assert config["device"] == "cuda"
    major, _ = torch.cuda.get_device_capability()
    assert config["compute_dtype"] == ("torch.bfloat16" if major >= 8 else "torch.float16")
    steps = progress(gpu_ws, job.id)
    assert sorted(steps) == list(range(1, 25))
    logs = [e["message"] for e in jobs.read_events(gpu_ws, job.id) if e["type"] == "log"]
    assert "optimizer PagedAdamW8bit" in logs  # auto picks paged 8-bit AdamW on any cuda:N
    rates = [steps[s]["tokens_per_s"] for s in range(5, 25)]
    peak = max(e["gpu_mem_gib"] for e in steps.values())
    report(f"{torch.cuda.get_device_name()}: SmolLM2-135M shape, NF4 + LoRA r=16, batch 8 x <=512, "
           f"paged AdamW 8-bit: median {statistics.median(rates):.0f} tokens/s (padded), "
           f"peak {peak:.2f} GiB; loss {steps[1]['loss']:.3f} -> {steps[24]['loss']:.3f}")


def test_kill_9_and_resume_on_the_gpu(gpu_ws: Workspace) -> None:
    straight = jobs.submit(gpu_ws, "train", params("straight"))
    assert api.run(gpu_ws, straight.id).state == "succeeded"
    job = jobs.start(gpu_ws, "train", params("killed"))
    deadline = time.monotonic() + 600
    while max(progress(gpu_ws, job.id), default=0) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(jobs.get(gpu_ws, job.id).pid, signal.SIGKILL)
    while jobs.get(gpu_ws, job.id).state != "interrupted" and time.monotonic() < deadline:
        time.sleep(0.2)
    jobs.resume(gpu_ws, job.id)
    while jobs.get(gpu_ws, job.id).state not in jobs.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs.get(gpu_ws, job.id).state == "succeeded"
    a, b = progress(gpu_ws, straight.id), progress(gpu_ws, job.id)
    worst = max(abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in a)
    report(f"kill -9 at step >= 6 and resume: worst relative loss difference {worst:.2e} over 24 steps")
    assert worst < 1e-3


def _run(ws: Workspace, name: str, **config: object) -> dict[int, dict]:
    p = params(name)
    # two micro-batches a step: a new shape is often captured between them
    p["config"] = {**CONFIG, "max_steps": 12, "eval_every": 12, "grad_accum": 2, **config}
    job = jobs.submit(ws, "train", p)
    assert api.run(ws, job.id).state == "succeeded", jobs.get(ws, job.id).message
    return progress(ws, job.id)


def test_cuda_graphs_train_as_the_eager_step_does(gpu_ws: Workspace) -> None:
    """cuda_graphs=on: without dropout the same math on padded shapes (the eager run's losses);
    with the product's dropout (masks from the Triton kernel, seeded on the device, where the
    eager step uses torch's generator: other masks) a loss curve within dropout's noise. A graph
    per padded shape, captured once; nothing falls back to eager."""
    eager = _run(gpu_ws, "eager-nodrop", lora_dropout=0.0)
    graphed = _run(gpu_ws, "graphed-nodrop", lora_dropout=0.0, cuda_graphs="on")
    eager_drop = _run(gpu_ws, "eager-drop", lora_dropout=0.05)
    graphed_drop = _run(gpu_ws, "graphed-drop", lora_dropout=0.05, cuda_graphs="on")
    offloaded = _run(gpu_ws, "graphed-offload", lora_dropout=0.05, cuda_graphs="on",
                     offload_activations=True)
    worst = [max(abs(a[s]["loss"] - b[s]["loss"]) / a[s]["loss"] for s in a)
             for a, b in ((eager, graphed), (eager_drop, graphed_drop), (graphed_drop, offloaded))]
    rates = [statistics.median(r[s]["tokens_per_s"] for s in range(5, 13))
             for r in (eager, graphed, eager_drop, graphed_drop)]
    report(f"cuda_graphs on vs off, 12 steps: worst relative loss difference {worst[0]:.2e} without "
           f"dropout, {worst[1]:.2e} with 0.05, {worst[2]:.2e} graphed with vs without activation "
           f"offload (the same seeded masks); median tokens/s (steps 5-12, captures included) "
           f"{rates[0]:.0f} -> {rates[1]:.0f} without, {rates[2]:.0f} -> {rates[3]:.0f} with")
    assert worst[0] < 5e-3 and worst[1] < 5e-2 and worst[2] < 5e-3
    assert graphed_drop[12]["loss"] < graphed_drop[1]["loss"]
    for name in ("graphed-nodrop", "graphed-drop", "graphed-offload"):
        job = next(j for j in jobs.list_jobs(gpu_ws) if j.params.get("name") == name)
        logs = [e["message"] for e in jobs.read_events(gpu_ws, job.id) if e["type"] == "log"]
        assert any(m.startswith("CUDA graphs on") for m in logs)
        assert any(m.startswith("CUDA graph: capturing") for m in logs)
        assert not any(m.startswith("CUDA graphs off") for m in logs), logs


def test_fp16_with_loss_scaling_as_on_a_t4(gpu_ws: Workspace) -> None:
    """A T4 has no bf16: force fp16 compute and check the run learns (finite, falling loss)."""
    p = params("fp16")
    p["config"] = {**CONFIG, "compute_dtype": "fp16", "max_steps": 12, "eval_every": 12}
    job = jobs.submit(gpu_ws, "train", p)
    assert api.run(gpu_ws, job.id).state == "succeeded", jobs.get(gpu_ws, job.id).message
    steps = progress(gpu_ws, job.id)
    assert all(math.isfinite(e["loss"]) for e in steps.values())
    assert steps[12]["loss"] < steps[1]["loss"]
    report(f"fp16 + GradScaler: loss {steps[1]['loss']:.3f} -> {steps[12]['loss']:.3f} in 12 steps")


def _smollm2_folder(root: Path) -> Path | None:
    """The real SmolLM2-135M-Instruct weights as an HF folder: the embedded GGUF dequantized by
    transformers, with the model's own tokenizer files (tests/fixtures). Where llama.cpp is
    installed the regular import would do; GPU hosts often lack it."""
    from transformers import AutoModelForCausalLM

    from appliance import stack
    from tests.conftest import TOKENIZER_DIR, TOKENIZER_FILES

    try:
        gguf = stack.default_model_path(verify=True)
    except Exception:
        return None
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    folder = root / "smollm2"
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        (folder / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    return folder


def test_the_real_smollm2_in_4bit_learns_on_the_gpu(gpu_ws: Workspace, tmp_path: Path) -> None:
    folder = _smollm2_folder(tmp_path)
    if folder is None:
        pytest.skip("the embedded SmolLM2 GGUF is not installed here (APPLIANCE_SHARE/models)")
    models.import_path(gpu_ws, folder, name="smollm2")
    p = {**params("smollm2-gpu"), "model": "smollm2",
         "config": {**CONFIG, "max_steps": 16, "eval_every": 8, "learning_rate": 2e-4}}
    job = jobs.submit(gpu_ws, "train", p)
    assert api.run(gpu_ws, job.id).state == "succeeded", jobs.get(gpu_ws, job.id).message
    evals = [e for e in jobs.read_events(gpu_ws, job.id) if e["type"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    report(f"real SmolLM2-135M-Instruct, NF4 + LoRA r=16, 16 steps: eval perplexity "
           f"{evals[0]['perplexity']:.3f} -> {evals[-1]['perplexity']:.3f}")


def test_a_1b_shaped_model_in_4bit_learns_on_the_gpu(gpu_ws: Workspace, tmp_path: Path) -> None:
    shape = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
             "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096}
    models.import_path(gpu_ws, build_random_llama(tmp_path / "llama1b", **shape), name="llama1b")
    p = {**params("llama1b-gpu"), "model": "llama1b",
         "config": {**CONFIG, "max_steps": 16, "eval_every": 8, "batch_size": 4, "learning_rate": 5e-4}}
    job = jobs.submit(gpu_ws, "train", p)
    assert api.run(gpu_ws, job.id).state == "succeeded", jobs.get(gpu_ws, job.id).message
    steps = progress(gpu_ws, job.id)
    evals = [e for e in jobs.read_events(gpu_ws, job.id) if e["type"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    report(f"Llama-3.2-1B shape (random init), NF4 + LoRA r=16, batch 4 x <=512: peak "
           f"{max(e['gpu_mem_gib'] for e in steps.values()):.2f} GiB, eval loss "
           f"{evals[0]['eval_loss']:.3f} -> {evals[-1]['eval_loss']:.3f}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs 2 GPUs")
def test_ddp_on_two_gpus_gives_the_loss_curve_of_one_gpu_at_the_same_global_batch(gpu_ws: Workspace) -> None:
    same = {**CONFIG, "lora_dropout": 0.0, "max_steps": 16, "eval_every": 8, "batch_size": 4}
    one = jobs.submit(gpu_ws, "train", {**params("one-gpu"), "config": {**same, "grad_accum": 2}})
    assert api.run(gpu_ws, one.id).state == "succeeded", jobs.get(gpu_ws, one.id).message
    two = jobs.submit(gpu_ws, "train", {**params("two-gpus"), "config": {**same, "devices": 2}})
    done = api.run(gpu_ws, two.id)
    log = gpu_ws.root / "jobs" / two.id / "workers.log"
    assert done.state == "succeeded", done.message + (log.read_text()[-3000:] if log.exists() else "")
    a, b = progress(gpu_ws, one.id), progress(gpu_ws, two.id)
    assert sorted(b) == sorted(a) == list(range(1, 17))
    worst = max(abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in a)
    rate = {k: statistics.median(r[s]["tokens_per_s"] for s in range(5, 17)) for k, r in (("1", a), ("2", b))}
    report(f"DDP 2 GPUs (batch 4 each) vs 1 GPU (batch 4 x grad_accum 2): worst relative loss "
           f"difference {worst:.2e} over 16 steps; median tokens/s {rate['1']:.0f} (1 GPU) vs "
           f"{rate['2']:.0f} (2 GPUs)")
    assert worst < 1e-2
