"""Merge, export and the parity gate on the real SmolLM2 (CPU), and on a tiny Qwen2-family model:
merged-vs-adapter gap, GGUF and ONNX artifacts scored against the merged model, a deliberately
broken artifact failing the gate, re-verification, and the bad-input paths."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance import api, jobs, manifest
from appliance.demo import sample_dataset
from appliance.errors import ApplianceError, DiskFullError, IntegrityError, RefusedError, ValidationError
from appliance.progress import Quiet
from appliance.stages.datasets import importer as datasets
from appliance.stages.export import convert
from appliance.stages.merge.merged import merge
from appliance.stages.models import importer as models
from appliance.stages.verify.gate import verify
from appliance.workspace import ArtifactRecord, Workspace, require_passed
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
TRAIN = {"lora_r": 4, "lora_alpha": 8, "max_steps": 2, "batch_size": 2, "grad_accum": 1,
         "max_seq_len": 192, "warmup_steps": 1, "learning_rate": 1e-3, "eval_every": 2,
         "save_every": 2, "eval_batches": 1, "seed": 1}


def _trained(ws: Workspace, model: ArtifactRecord, tmp: Path, name: str = "run") -> str:
    lines = sample_dataset().read_text(encoding="utf-8").splitlines()[:40]
    small = tmp / "small.jsonl"
    small.write_text("\n".join(lines) + "\n", encoding="utf-8")
    datasets.import_file(ws, small, model, name="small", eval_fraction=0.25)
    job = jobs.submit(ws, "train", {"model": model.name, "dataset": "small", "config": TRAIN,
                                    "source": "test", "name": name})
    assert api.run(ws, job.id).state == "succeeded", jobs.get(ws, job.id).message
    return name


@pytest.fixture(scope="module")
def smol_run(module_tmp: ModuleTemp, smol_model: ArtifactRecord) -> Workspace:
    tmp = module_tmp.mktemp("exports")
    ws = Workspace(tmp / "ws").ensure()
    shutil.copytree(smol_model.path, ws.artifact_dir("model", smol_model.name))
    ws.reconcile()
    _trained(ws, ws.get("model", smol_model.name), tmp)
    return ws


def test_merge_matches_the_adapter_and_is_idempotent(smol_run: Workspace) -> None:
    merged = merge(smol_run, "run")
    check = json.loads((merged.path / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] < 1e-3 and check["adapted_weights"] == 210
    report = json.loads((merged.path / "parity.json").read_text())
    assert report["artifacts"][0]["name"] == "adapter" and report["artifacts"][0]["passed"] is None
    again = merge(smol_run, "run")
    assert again.manifest_sha256 == merged.manifest_sha256  # found, not rewritten
    with pytest.raises(ApplianceError, match="merged with dtype=auto base=full, not base=nf4"):
        merge(smol_run, "run", base="nf4")


def test_gguf_export_is_scored_and_passes_its_gate(smol_run: Workspace) -> None:
    (record,) = convert.export_gguf(smol_run, "run", ["q8_0"], scratch=smol_run.root / "scratch")
    assert record.name == "run-gguf-q8_0" and record.status == "ready"
    report = json.loads((record.path / "parity.json").read_text())
    row = report["artifacts"][0]
    assert row["passed"] and row["tokens_identical"] is True and row["kind"] == "q8_0"
    assert row["threshold"]["ppl_increase"] == 0.02 and abs(row["ppl_increase"]) < 0.02
    assert row["decode_tokens_per_s"] > 0 and row["decode_tokens"] == 32  # timed in llama.cpp, this box
    assert report["conversations"] >= 5 and report["tokens"] > 200
    assert "\nFROM ./run-Q8_0.gguf\n" in (record.path / "Modelfile").read_text()
    manifest.verify(record.path)
    # the base model's licence travels: recorded, its text copied, in the GGUF and the Modelfile
    from appliance import modelio

    (lic,) = manifest.read(record.path)["info"]["licenses"]
    assert lic["role"] == "base model" and lic["id"] == "apache-2.0"
    assert "smollm2" in lic["attribution"].lower() and "HuggingFaceTB" in lic["attribution"]
    assert "Apache License" in (record.path / lic["files"][0]).read_text()
    meta = modelio.gguf_metadata(record.path / "run-Q8_0.gguf")
    assert meta["general.license"] == "apache-2.0"
    assert meta["general.base_model.count"] == 1
    assert meta["general.base_model.0.name"] == lic["name"]
    assert 'LICENSE """' in (record.path / "Modelfile").read_text()


def test_a_broken_artifact_fails_the_gate_and_is_refused(smol_run: Workspace) -> None:
    """Q2_K garbles a 135M model (without an importance matrix): the gate must say so, the registry
    must mark it failed."""
    (record,) = convert.export_gguf(smol_run, "run", ["Q2_K"], scratch=smol_run.root / "scratch",
                                    imatrix="off")
    assert record.status == "failed"
    row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
    assert not row["passed"] and row["reasons"]
    with pytest.raises(RefusedError, match="failed its parity gate"):
        require_passed(record)
    require_passed(record, override=True)
    _cancel_and_crash_leave_the_old_verdict(smol_run, record)
    # an explicit, recorded override of the thresholds flips the verdict and keeps the manifest valid
    report = verify(smol_run, record.name, overrides={"ppl_increase": 100.0, "kl": 100.0,
                                                               "agreement": 0.0})
    assert report["passed"]
    assert smol_run.get("export", record.name).status == "ready"
    manifest.verify(smol_run.get("export", record.name).path)


def _cancel_and_crash_leave_the_old_verdict(ws: Workspace, record: ArtifactRecord) -> None:
    """A cancel inside the scoring, and a crash at the moment the new verdict is swapped in, both
    leave the export exactly as it was (failed, and matching its manifest)."""
    lenient = {"ppl_increase": 100.0, "kl": 100.0, "agreement": 0.0}
    calls: list[int] = []

    class CancelOnThird(Quiet):
        def check_cancel(self) -> None:
            calls.append(1)
            if len(calls) == 3:
                raise jobs.JobCancelled("cancel requested")

    with pytest.raises(jobs.JobCancelled):
        verify(ws, record.name, overrides=lenient, report=CancelOnThird())
    assert len(calls) == 3  # checked per conversation, not only at the end

    def crash(*_: object) -> bool:
        raise OSError("simulated crash while swapping")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("appliance.workspace.exchange", crash)
        with pytest.raises(OSError, match="simulated crash"):
            verify(ws, record.name, overrides=lenient)
    again = ws.get("export", record.name)
    assert again.status == "failed"
    manifest.verify(again.path)
    assert not [p for p in again.path.parent.iterdir() if p.name.startswith(".")
                and record.name in p.name]  # no staging copy left behind


def test_onnx_int4_export_generates_and_is_scored(smol_run: Workspace) -> None:
    from export.onnx import OnnxLM

    (record,) = convert.export_onnx(smol_run, "run", ["int4"], scratch=smol_run.root / "scratch")
    row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
    assert row["tokens_identical"] is True and row["kind"] == "int4"
    assert row["passed"] is True and record.status == "ready", row  # +10% on the demo run
    lm = OnnxLM(record.path / "onnx")
    ids = lm.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    out = lm.generate(ids, 40, lm.stop_ids)
    assert 0 < len(out) < 40  # stopped on EOS before the limit


def test_the_frontier_lists_the_run_s_exports_side_by_side(smol_run: Workspace,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main as cli
    from appliance.stages.verify import frontier

    scratch = smol_run.root / "scratch"
    convert.export_gguf(smol_run, "run", ["q8_0"], scratch=scratch)  # made above, or made now
    convert.export_onnx(smol_run, "run", ["int4"], scratch=scratch)
    rows = {r.name: r for r in frontier.frontier(smol_run, "run")}
    gguf, onnx = rows["run-gguf-q8_0"], rows["run-onnx-int4"]
    for row in (gguf, onnx):
        parity = json.loads((smol_run.get("export", row.name).path / "parity.json").read_text())
        assert row.ppl_increase == parity["artifacts"][0]["ppl_increase"]
        assert row.decode_tokens_per_s and row.decode_tokens_per_s > 0 and row.size_bytes > 10 * 2**20
    assert "run-merged" not in rows  # the reference, not a candidate
    # a smaller export with a larger loss does not beat a larger, closer one (and the reverse):
    # both stay on the frontier unless one is also no worse on the other two
    assert any(r.frontier for r in rows.values())
    assert cli(["--home", str(smol_run.root), "exports", "frontier", "run"]) == 0
    out = capsys.readouterr().out
    assert "run-gguf-q8_0" in out and "run-onnx-int4" in out and "tok/s" in out
    assert cli(["--home", str(smol_run.root), "exports", "frontier", "run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in data["exports"]} >= {"run-gguf-q8_0", "run-onnx-int4"}


def test_export_plan_makes_the_candidates_in_one_job_then_lists_them(
        smol_run: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main as cli

    before = {j.id for j in jobs.list_jobs(smol_run)}
    code = cli(["--home", str(smol_run.root), "export", "plan", "run", "--gguf", "Q8_0,BF16",
                "--onnx", "int4,int8", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in data["exports"]}
    assert {"run-gguf-q8_0", "run-gguf-bf16", "run-onnx-int4", "run-onnx-int8"} <= set(rows)
    assert rows["run-onnx-int8"]["decode_tokens_per_s"] > 0  # made now, scored and timed
    (job,) = [j for j in jobs.list_jobs(smol_run) if j.id not in before]  # one job: it outlives the CLI
    assert (job.params["format"], job.state, data["job"]["id"]) == ("plan", "succeeded", job.id)
    assert list(job.result["exports"]) == ["run-gguf-q8_0", "run-gguf-bf16", "run-onnx-int4",
                                           "run-onnx-int8"]
    # BF16 and int8 at least were made and gated (all four, and the merge, when this test runs
    # alone): the merged model was scored once for the whole job
    stages = _stages([e for e in jobs.read_events(smol_run, job.id) if e["type"] == "progress"])
    assert stages.count("load-reference") == 1 and stages.count("time-decode") >= 2
    # a bad candidate is refused before any job is queued, naming it
    assert cli(["--home", str(smol_run.root), "export", "plan", "run", "--onnx", "int3"]) != 0
    assert "unknown quantization type 'int3'" in capsys.readouterr().err
    assert len(jobs.list_jobs(smol_run)) == len(before) + 1


def test_int4_keeps_the_weights_measured_most_sensitive_and_loses_less(smol_run: Workspace) -> None:
    """`--calibrate auto` (the default) against the fixed layout, on the same run, held-out data
    and gate: the layout is measured on the run's training conversations (recorded by hash, never
    the held-out ones), costs the same bytes, and passes thresholds that the fixed layout fails."""
    from appliance.stages.export import importance, layout
    from appliance.stages.merge.inputs import run_inputs

    scratch = smol_run.root / "scratch"
    (record,) = convert.export_onnx(smol_run, "run", ["int4"], scratch=scratch)  # made above
    info = manifest.read(record.path)["info"]
    cal = info["calibration"]
    assert cal["used"] and cal["method"] == "fisher" and info["summary"]["calibrated"] is True
    _, _, dataset = run_inputs(smol_run, "run")
    train = [importance.conversation_hash(r["messages"]) for r in datasets.load_rows(dataset, "train")]
    held_out = {importance.conversation_hash(r["messages"]) for r in datasets.load_rows(dataset, "eval")}
    kept = json.loads((record.path / layout.LAYOUT_FILE).read_text())
    used = kept["conversation_sha256"]
    assert len(used) == cal["calibration"]["conversations"] == layout.CONVERSATIONS
    assert used == [h for h in train if h in used] and not set(used) & held_out  # training, in order
    assert cal["calibration"]["split"] == "train" and cal["calibration"]["tokens"] > 100
    details = json.loads((record.path / "onnx_export.json").read_text())["quantization"]
    assert details["layout"] == "measured" and details["eight_bit"] == len(kept["eight_bit"]) > 1
    assert "/lm_head/MatMul" in kept["eight_bit"] and len(kept["scores"]) == details["weight_matmuls"]
    manifest.verify(record.path)  # the layout file is one of the artifact's files
    measured = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
    size = json.loads((record.path / "onnx_export.json").read_text())["files"]["model.onnx"]
    with pytest.raises(ApplianceError, match="made with a measured 8-bit layout"):
        convert.export_onnx(smol_run, "run", ["int4"], scratch=scratch, calibrate="off")

    smol_run.remove("export", record.name)
    (fixed_record,) = convert.export_onnx(smol_run, "run", ["int4"], scratch=scratch, calibrate="off")
    assert manifest.read(fixed_record.path)["info"]["calibration"] == {"used": False,
                                                                       "why": "--calibrate off"}
    fixed_details = json.loads((fixed_record.path / "onnx_export.json").read_text())
    assert fixed_details["quantization"]["layout"] == "fixed"
    fixed = json.loads((fixed_record.path / "parity.json").read_text())["artifacts"][0]
    fixed_size = fixed_details["files"]["model.onnx"]
    assert abs(size - fixed_size) < 0.01 * fixed_size  # the same 8-bit bytes, spent elsewhere
    assert measured["kl"] < 0.8 * fixed["kl"] and measured["ppl_increase"] < fixed["ppl_increase"]
    strict = {"ppl_increase": 0.06, "kl": 0.10}  # the goal (+5%), with room for noise
    assert measured["ppl_increase"] <= strict["ppl_increase"] and measured["kl"] <= strict["kl"]
    assert verify(smol_run, fixed_record.name, overrides=strict)["passed"] is False
    smol_run.remove("export", fixed_record.name)  # the next tests make the default one again


def test_int4_cuda_is_genai_s_graph_with_the_same_measured_layout_and_passes(smol_run: Workspace) -> None:
    """The CUDA int4 (issue 16): genai's fp16 graph quantized with the layout measured for the job
    (the same modules at 8 bits as the CPU's int4), gated on the CPU, and it answers and stops."""
    from appliance.stages.export import layout
    from export.onnx import OnnxLM

    scratch = smol_run.root / "scratch"
    (int4,) = convert.export_onnx(smol_run, "run", ["int4"], scratch=scratch)
    (record,) = convert.export_onnx(smol_run, "run", ["int4-cuda"], scratch=smol_run.root / "scratch2")
    calibration = manifest.read(record.path)["info"]["calibration"]
    # another job (another scratch): the layout int4 measured is taken, not measured again
    assert calibration["used"] is True and calibration["reused_from"] == int4.name
    details = json.loads((record.path / "onnx_export.json").read_text())
    assert details["graph"] == "onnxruntime-genai builder" and details["kv_dtype"] == "FLOAT16"
    assert details["quantization"]["layout"] == "measured"
    kept = json.loads((int4.path / layout.LAYOUT_FILE).read_text())["eight_bit"]
    graph = onnx_graph(record.path / "onnx")
    eight = {n.name.rsplit("_Q", 1)[0] for n in graph.node if n.op_type == "MatMulNBits"
             and next(a.i for a in n.attribute if a.name == "bits") == 8}
    # optimum's '/model/layers.3/self_attn/v_proj/MatMul' is genai's '/model/layers.3/attn/v_proj/MatMul'
    assert eight == {n.replace("/self_attn/", "/attn/") for n in kept}
    row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
    assert row["kind"] == "int4-cuda" and row["passed"] is True and record.status == "ready", row
    lm = OnnxLM(record.path / "onnx")
    out = lm.generate(lm.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                  "<|im_start|>assistant\n"), 40, lm.stop_ids)
    assert 0 < len(out) < 40
    smol_run.remove("export", record.name)


def onnx_graph(folder: Path) -> Any:
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def test_below_six_bits_the_gguf_uses_an_imatrix_of_the_runs_training_chats(
        smol_run: Workspace, tmp_path: Path) -> None:
    """The real llama-imatrix and llama-quantize (set-up builds them): the importance matrix is made
    from the run's training conversations, recorded (with their hashes) and used."""
    import hashlib

    from appliance import modelio, stack
    from appliance.fsutil import sha256_file
    from appliance.stages.export import importance
    from appliance.stages.merge.inputs import run_inputs
    from export import gguf

    if stack.llama_tools_missing():
        pytest.skip(f"llama.cpp's {', '.join(stack.llama_tools_missing())} are not installed here "
                    "(scripts/setup.sh builds them; CI runs it)")
    lines: list[str] = []
    events: list[dict[str, object]] = []

    class Recorder(Quiet):
        def log(self, message: str) -> None:
            lines.append(message)

        def progress(self, done: float, total: float, **fields: object) -> None:
            events.append({"done": done, "total": total, **fields})

    scratch = tmp_path / "scratch"
    (record,) = convert.export_gguf(smol_run, "run", ["Q4_K_M"], scratch=scratch, report=Recorder())
    imx = manifest.read(record.path)["info"]["imatrix"]
    assert imx["used"] and imx["source"] == "run" and imx["chunk_size"] == 512
    # made from the run's training conversations, all of them, in order, recorded by hash
    _, _, dataset = run_inputs(smol_run, "run")
    hashes = [importance.conversation_hash(r["messages"]) for r in datasets.load_rows(dataset, "train")]
    calib = imx["calibration"]
    assert (calib["run"], calib["dataset"], calib["split"]) == ("run", "small", "train")
    assert calib["conversations"] == calib["conversations_total"] == len(hashes) == 30
    assert calib["conversations_sha256"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    kept = json.loads((record.path / importance.CALIBRATION_FILE).read_text())
    assert kept["conversation_sha256"] == hashes
    assert imx["chunks"] == calib["tokens"] // 512 or imx["chunks"] == calib["tokens"] // 512 - 1
    assert imx["sha256"] == sha256_file(record.path / importance.IMATRIX_FILE)
    assert "llama-cpp-python" in imx["tool"]
    manifest.verify(record.path)  # the imatrix and the hashes are files of the artifact
    # used: llama-quantize wrote what it used into the GGUF, and the file differs from a plain one
    path = record.path / "run-Q4_K_M.gguf"
    meta = modelio.gguf_metadata(path)
    assert meta["quantize.imatrix.chunks_count"] == imx["chunks"]
    assert meta["quantize.imatrix.entries_count"] == imx["entries"] > 0
    plain = gguf.quantize(scratch / "run-F16.gguf", tmp_path / "plain.gguf", "Q4_K_M")
    assert "quantize.imatrix.chunks_count" not in modelio.gguf_metadata(plain)
    assert sha256_file(plain) != sha256_file(path)
    # counted in chunks while it ran, then scored by the parity gate as any export
    counted = [e for e in events if e.get("stage") == "imatrix"]
    assert counted and counted[-1]["unit"] == "chunks" and counted[0]["done"] == 0
    assert counted[-1]["done"] == counted[-1]["total"] in (imx["chunks"], imx["chunks"] + 1)
    assert any("computing over" in line for line in lines)
    report = json.loads((record.path / "parity.json").read_text())
    assert report["artifacts"][0]["kind"] == "q4_k_m" and record.summary["imatrix"] is True
    # asked again: reused with auto; refused with off (it would be another file)
    assert convert.export_gguf(smol_run, "run", ["Q4_K_M"], scratch=scratch)[0].path == record.path
    with pytest.raises(ApplianceError, match="made with an importance matrix"):
        convert.export_gguf(smol_run, "run", ["Q4_K_M"], scratch=scratch, imatrix="off")


def test_bad_inputs_get_clear_errors(smol_run: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ApplianceError, match="no finished run named 'nope'"):
        merge(smol_run, "nope")
    with pytest.raises(ValidationError, match="Q4_K_M"):
        convert.export_gguf(smol_run, "run", ["Q9_Z"], scratch=smol_run.root / "scratch")
    with pytest.raises(ValidationError, match="int4"):
        convert.export_onnx(smol_run, "run", ["int3"], scratch=smol_run.root / "scratch")

    from export import gguf

    def full_disk(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf, "quantize", full_disk)
    with pytest.raises(DiskFullError, match=r"disk full at .*run-gguf-q6_k"):
        convert.export_gguf(smol_run, "run", ["Q6_K"], scratch=smol_run.root / "scratch")
    assert not list((smol_run.root / "exports").glob(".staging-*"))
    assert not smol_run.artifact_dir("export", "run-gguf-q6_k").exists()


def test_tampered_export_is_not_reused(smol_run: Workspace) -> None:
    record = merge(smol_run, "run")
    config = record.path / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b" ")
    try:
        with pytest.raises(IntegrityError):
            merge(smol_run, "run")
    finally:
        config.write_bytes(original)


def test_missing_base_model_is_named(tmp_path: Path, smol_run: Workspace) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(smol_run.artifact_dir("run", "run"), ws.artifact_dir("run", "run"))
    ws.reconcile()
    with pytest.raises(ApplianceError, match="no longer in the workspace"):
        merge(ws, "run")


def test_a_second_architecture_merges_and_exports_losslessly(tmp_path: Path, tiny_qwen2_source: Path
                                                              ) -> None:
    """Qwen2 family (attention biases, tied embeddings): F16 GGUF and fp32 ONNX pass their gates.
    Each step also reports its stages, with honest counts (`_check_*` below)."""
    ws = Workspace(tmp_path / "ws")
    model = models.import_path(ws, tiny_qwen2_source, name="tiny-qwen2")
    run = _trained(ws, model, tmp_path)
    merge_events, report = _recorder()
    merged = merge(ws, run, report=report)
    assert json.loads((merged.path / "merge_check.json").read_text())["max_abs_logit_diff"] < 1e-3
    _check_merge_progress(merge_events, merged)
    gguf_events, report = _recorder()
    gguf_record, q8_record = convert.export_gguf(ws, run, ["F16", "Q8_0"], scratch=tmp_path / "scratch",
                                                 report=report)
    _check_gguf_progress(gguf_events, merged, [gguf_record, q8_record])
    onnx_events, report = _recorder()
    (onnx_record,) = convert.export_onnx(ws, run, ["fp32"], scratch=tmp_path / "scratch",
                                         report=report)
    assert _stages(onnx_events) == ["reuse", "export-onnx", "load-runtime", "load-reference", "score",
                                    "time-decode", "record", "done"]
    for record in (gguf_record, onnx_record):
        row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
        assert record.status == "ready", row
        assert row["tokens_identical"] is True and row["agreement"] > 0.97
    _check_job_progress(ws, run, gguf_record)
    _check_gated_again(ws, run, gguf_record, tmp_path / "scratch")
    _check_eval_of_the_onnx_export(ws, run, onnx_record)


def _check_eval_of_the_onnx_export(ws: Workspace, run: str, onnx_record: ArtifactRecord) -> None:
    """`appliance eval` of an ONNX export answers through onnxruntime (the engine `serve` runs;
    `OnnxLM` scores the reference) and each reference's perplexity is within 1% of the adapter's
    through peft: the same weights, merged and exported."""
    from appliance.stages.eval.request import EvalRequest

    request = EvalRequest((run, onnx_record.name), limit=3, max_new_tokens=8, name="onnx-eval")
    job = api.run(ws, api.submit(ws, request.kind, request.to_params()).id)
    assert job.state == "succeeded", job.message
    doc = json.loads((ws.get("eval", "onnx-eval").path / "eval.json").read_text(encoding="utf-8"))
    adapter, onnx = doc["targets"]
    assert (adapter["runtime"], onnx["runtime"]) == ("transformers+peft", "onnxruntime")
    assert all(0 < i["tokens"] <= 8 for i in onnx["items"])
    for mine, theirs in zip(onnx["items"], adapter["items"], strict=True):
        assert mine["ppl"] == pytest.approx(theirs["ppl"], rel=0.01)


# -- staged progress -------------------------------------------------------------------------------
class _Recorder(Quiet):
    """A reporter that keeps the progress events."""

    def __init__(self, events: list[dict]) -> None:
        self.events = events

    def progress(self, done: float, total: float, **fields: object) -> None:
        self.events.append({"done": done, "total": total, **fields})


def _recorder() -> tuple[list[dict], _Recorder]:
    events: list[dict] = []
    return events, _Recorder(events)


def _stages(events: list[dict]) -> list[str]:
    """The stages in order, each run of one stage once (the reference's and the artifact's
    scoring, one after the other, are one `score`)."""
    return [e["stage"] for i, e in enumerate(events) if i == 0 or events[i - 1]["stage"] != e["stage"]]


def _runs(events: list[dict], stage: str) -> list[list[dict]]:
    """The events of each run of `stage` (a new run starts at each new label or done=0)."""
    runs: list[list[dict]] = []
    for i, e in enumerate(events):
        if e["stage"] != stage:
            continue
        before = events[i - 1] if i else None
        if before is None or before["stage"] != stage or before["label"] != e["label"]:
            runs.append([])
        runs[-1].append(e)
    return runs


def _check_counts(events: list[dict]) -> None:
    """Counts never go back within a stage, never pass their total, and a stage of unknown size
    (total 0) claims nothing done."""
    for run in (r for stage in {e["stage"] for e in events} for r in _runs(events, stage)):
        done = [e["done"] for e in run]
        assert done == sorted(done), run
        assert all(0 <= e["done"] <= e["total"] for e in run), run


def _check_scores(events: list[dict], labels: list[str], conversations: int) -> None:
    runs = _runs(events, "score")
    assert [r[0]["label"] for r in runs] == labels
    for run in runs:
        assert run[0]["done"] == 0 and run[-1]["done"] == run[-1]["total"] == conversations
        assert {e["unit"] for e in run} == {"conversations"}


def _check_merge_progress(events: list[dict], merged: ArtifactRecord) -> None:
    from appliance import tensorstream

    assert _stages(events) == ["check-inputs", "merge", "check-merge", "load-adapter", "load-reference",
                               "score", "record", "done"]
    assert {e["artifact"] for e in events} == {merged.name}
    assert {e["artifacts_total"] for e in events} == {1}
    _check_counts(events)
    tensors = sum(len(tensorstream.entries(p)[0]) for p in merged.path.glob("*.safetensors"))
    (merging,) = _runs(events, "merge")
    assert merging[0]["total"] == 0  # announced before the headers are read
    assert merging[-1]["done"] == merging[-1]["total"] == tensors and merging[-1]["unit"] == "tensors"
    assert len(merging) <= 22  # about one per 1/20th: a large model cannot flood the event file
    conversations = json.loads((merged.path / "parity.json").read_text())["conversations"]
    _check_scores(events, ["scoring the reference (merged)", "scoring adapter"], conversations)
    assert events[-1] == {"done": 1, "total": 1, "stage": "done", "label": "done", "unit": "artifacts",
                          "artifact": merged.name, "artifacts_done": 1, "artifacts_total": 1}


def _check_gguf_progress(events: list[dict], merged: ArtifactRecord, records: list[ArtifactRecord]
                         ) -> None:
    f16, q8 = (r.name for r in records)
    assert _stages(events) == ["reuse", "convert", "check", "load-runtime", "load-reference", "score",
                               "time-decode", "record", "quantize", "check", "load-runtime", "score",
                               "time-decode", "record", "done"]
    _check_counts(events)
    assert events[0] == {"done": 1, "total": 1, "stage": "reuse", "unit": "", "artifact": merged.name,
                         "label": "exists and matches its manifest: reused", "artifacts_done": 0,
                         "artifacts_total": 2}
    (convert,) = _runs(events, "convert")
    assert convert[0]["total"] == 0 and convert[-1]["done"] == convert[-1]["total"] == 100
    (quantize,) = _runs(events, "quantize")
    assert quantize[0]["label"] == "quantizing to Q8_0" and quantize[-1]["unit"] == "tensors"
    assert quantize[-1]["done"] == quantize[-1]["total"] > 0
    assert {e["artifact"] for e in convert} == {f16} and {e["artifact"] for e in quantize} == {q8}
    assert {(e["artifact"], e["artifacts_done"]) for e in events[1:-1]} == {(f16, 0), (q8, 1)}
    conversations = json.loads((records[0].path / "parity.json").read_text())["conversations"]
    # the reference is scored once for both artifacts, and both reports carry the same numbers
    _check_scores(events, ["scoring the reference (merged)", "scoring f16", "scoring q8_0"],
                  conversations)
    refs = [json.loads((r.path / "parity.json").read_text())["reference"] for r in records]
    assert refs[0] == refs[1]
    assert events[-1]["stage"] == "done" and events[-1]["done"] == events[-1]["total"] == 2


def _check_job_progress(ws: Workspace, run: str, record: ArtifactRecord) -> None:
    """The job functions pass their `JobContext` as the reporter: the stages land in the job's events, and
    `appliance jobs logs` prints them as one readable line each. (The verify job's impossible
    threshold leaves the export failed, for `_check_gated_again`.)"""
    from appliance.textout import format_event

    job = jobs.submit(ws, "verify", {"export": record.name, "overrides": {"agreement": 1.01}})
    assert api.run(ws, job.id).result == {"passed": False}
    staged = [e for e in jobs.read_events(ws, job.id) if e["type"] == "progress"]
    assert _stages(staged) == ["check-files", "load-runtime", "load-reference", "score", "time-decode",
                               "done"]
    assert {e["artifact"] for e in staged} == {record.name}
    last_score = [e for e in staged if e["stage"] == "score"][-1]
    conversations = last_score["total"]
    assert format_event(last_score) == f"{record.name}: scoring f16 {conversations}/{conversations} " \
                                       "conversations"
    job = jobs.submit(ws, "merge", {"run": run})
    assert api.run(ws, job.id).state == "succeeded"
    lines = [format_event(e) for e in jobs.read_events(ws, job.id) if e["type"] == "progress"]
    assert lines == [f"{run}-merged: exists and matches its manifest: reused", "done 1/1 artifacts"]


def _check_gated_again(ws: Workspace, run: str, record: ArtifactRecord, scratch: Path) -> None:
    """A failed artifact asked for again with thresholds is gated again, inside the export's
    stages (and counted as that export's artifact)."""
    assert ws.get("export", record.name).status == "failed"
    events, report = _recorder()
    (again,) = convert.export_gguf(ws, run, ["F16"], scratch=scratch, overrides={"agreement": 0.5},
                                   report=report)
    assert again.status == "ready"
    assert _stages(events) == ["reuse", "check-files", "load-runtime", "load-reference", "score",
                               "time-decode", "done"]
    assert {e["artifact"] for e in events[1:]} == {record.name}
    assert events[-1]["done"] == events[-1]["total"] == 1


# The importing box runs the edge profile: torch and friends cannot be imported there.
EDGE_IMPORT = """
import sys
for _name in ("torch", "transformers", "peft", "safetensors", "sentencepiece", "bitsandbytes", "optimum"):
    sys.modules[_name] = None
import json
from pathlib import Path
from appliance import audit, signing
from appliance.runtime import engines
from appliance.stages.bundle import importer
from appliance.stages.bundle.request import BundleImportRequest
from appliance.workspace import Workspace
ws = Workspace(Path(sys.argv[1])).ensure()
signing.trust_add(ws, Path(sys.argv[3]), "training-box")
done = importer.import_bundle(ws, BundleImportRequest.make(sys.argv[2]))
engine = engines.open_engine(engines.resolve(done.imported[0], ws), threads=1, context_length=512)
items = list(engine.generate([{"role": "user", "content": "Name a colour."}],
                             engines.Sampling(temperature=0.0, max_tokens=4)))
engine.close()
import asyncio, urllib.request
from appliance.runtime import keys, server, service
key = keys.create(ws, "edge")
srv = service.load(ws, service.ServeOptions((done.imported[0],), port=0, threads=1, context=512),
                   lambda _: None)

def ask(port):
    body = json.dumps({"model": done.imported[0], "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hi."}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as response:
        return json.loads(response.read())

async def serve_one():
    runner, port = await server.start(srv)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, ask, port)
    finally:
        await runner.cleanup()

answer = asyncio.run(serve_one())
print("RESULT", json.dumps({"imported": done.imported, "trusted_as": done.trusted_as,
                            "tokens": items[-1].completion_tokens,
                            "served": answer["usage"]["completion_tokens"],
                            "audit_ok": audit.verify(ws.root, ws.connect).ok}))
"""


def test_a_bundle_carries_an_export_to_an_edge_box_that_serves_and_chats_with_it(
        smol_run: Workspace, tmp_path: Path) -> None:
    import subprocess
    import sys

    from appliance import signing
    from appliance.errors import NotFoundError
    from appliance.stages.bundle import create
    from appliance.stages.bundle.request import BundleCreateRequest

    try:  # made by the GGUF test above when the whole module runs
        record = smol_run.get("export", "run-gguf-q8_0")
    except NotFoundError:
        (record,) = convert.export_gguf(smol_run, "run", ["q8_0"], scratch=smol_run.root / "scratch")
    if not signing.own_keys(smol_run):
        signing.create(smol_run, "training-box")
    out = tmp_path / "run.bundle"
    made = create.create(smol_run, BundleCreateRequest.make([record.name], str(out)))
    assert made.key_id and out.stat().st_size > (record.path / "run-Q8_0.gguf").stat().st_size
    pub = tmp_path / "training-box.pub"
    pub.write_bytes(signing.own_key(smol_run).pem)
    edge = tmp_path / "edge"
    done = subprocess.run([sys.executable, "-c", EDGE_IMPORT, str(edge), str(out), str(pub)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert result == {"imported": [record.name], "trusted_as": "training-box",
                      "tokens": result["tokens"], "served": result["served"], "audit_ok": True}
    assert result["tokens"] > 0 and result["served"] > 0  # chatted with, and served over HTTP
    imported = Workspace(edge).get("export", record.name)
    assert imported.manifest_sha256 == record.manifest_sha256
    assert json.loads((imported.path / "parity.json").read_text()) == \
        json.loads((record.path / "parity.json").read_text())
    kept = Workspace(edge).list("bundle")[0].path
    bom = json.loads((kept / "bom.cdx.json").read_text())
    kinds = {p["value"] for c in bom["components"] for p in c.get("properties", [])
             if p["name"] == "appliance:kind"}
    assert {"export", "run", "model", "dataset"} <= kinds
    assert any(c["type"] == "library" and c["name"] == "torch" for c in bom["components"])
