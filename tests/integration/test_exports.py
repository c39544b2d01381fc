"""Merge, export and the parity gate on the real SmolLM2 (CPU), and on a tiny Qwen2-family model:
merged-vs-adapter gap, GGUF and ONNX artifacts scored against the merged model, a deliberately
broken artifact failing the gate, re-verification, and the bad-input paths."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from appliance import datasets, exports, jobs, manifest, models
from appliance.demo import sample_dataset
from appliance.errors import ApplianceError, IntegrityError, RefusedError, ValidationError
from appliance.workspace import ArtifactRecord, Workspace

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
    assert jobs.run(ws, job.id).state == "succeeded", jobs.get(ws, job.id).message
    return name


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory: pytest.TempPathFactory, smol_model: ArtifactRecord) -> Workspace:
    tmp = tmp_path_factory.mktemp("exports")
    ws = Workspace(tmp / "ws").ensure()
    shutil.copytree(smol_model.path, ws.artifact_dir("model", smol_model.name))
    ws.reconcile()
    _trained(ws, ws.get("model", smol_model.name), tmp)
    return ws


def test_merge_matches_the_adapter_and_is_idempotent(smol_run: Workspace) -> None:
    merged = exports.merge(smol_run, "run")
    check = json.loads((merged.path / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] < 1e-3 and check["adapted_weights"] == 210
    report = json.loads((merged.path / "parity.json").read_text())
    assert report["artifacts"][0]["name"] == "adapter" and report["artifacts"][0]["passed"] is None
    again = exports.merge(smol_run, "run")
    assert again.manifest_sha256 == merged.manifest_sha256  # found, not rewritten
    with pytest.raises(ApplianceError, match="merged with dtype=auto base=full, not base=nf4"):
        exports.merge(smol_run, "run", base="nf4")


def test_gguf_export_is_scored_and_passes_its_gate(smol_run: Workspace) -> None:
    (record,) = exports.export_gguf(smol_run, "run", ["q8_0"], scratch=smol_run.root / "scratch")
    assert record.name == "run-gguf-q8_0" and record.status == "ready"
    report = json.loads((record.path / "parity.json").read_text())
    row = report["artifacts"][0]
    assert row["passed"] and row["tokens_identical"] is True and row["kind"] == "q8_0"
    assert row["threshold"]["ppl_increase"] == 0.02 and abs(row["ppl_increase"]) < 0.02
    assert report["conversations"] >= 5 and report["tokens"] > 200
    assert "\nFROM ./run-Q8_0.gguf\n" in (record.path / "Modelfile").read_text()
    manifest.verify(record.path)


def test_a_broken_artifact_fails_the_gate_and_is_refused(smol_run: Workspace) -> None:
    """Q2_K garbles a 135M model: the gate must say so, the registry must mark it failed."""
    (record,) = exports.export_gguf(smol_run, "run", ["Q2_K"], scratch=smol_run.root / "scratch")
    assert record.status == "failed"
    row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
    assert not row["passed"] and row["reasons"]
    with pytest.raises(RefusedError, match="failed its parity gate"):
        exports.require_passed(record)
    exports.require_passed(record, override=True)
    _cancel_and_crash_leave_the_old_verdict(smol_run, record)
    # an explicit, recorded override of the thresholds flips the verdict and keeps the manifest valid
    report = exports.verify(smol_run, record.name, overrides={"ppl_increase": 100.0, "kl": 100.0,
                                                               "agreement": 0.0})
    assert report["passed"]
    assert smol_run.get("export", record.name).status == "ready"
    manifest.verify(smol_run.get("export", record.name).path)


def _cancel_and_crash_leave_the_old_verdict(ws: Workspace, record: ArtifactRecord) -> None:
    """A cancel inside the scoring, and a crash at the moment the new verdict is swapped in, both
    leave the export exactly as it was (failed, and matching its manifest)."""
    lenient = {"ppl_increase": 100.0, "kl": 100.0, "agreement": 0.0}
    calls: list[int] = []

    def cancel_on_third() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise jobs.JobCancelled("cancel requested")

    with pytest.raises(jobs.JobCancelled):
        exports.verify(ws, record.name, overrides=lenient, check_cancel=cancel_on_third)
    assert len(calls) == 3  # checked per conversation, not only at the end

    def crash(*_: object) -> bool:
        raise OSError("simulated crash while swapping")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("appliance.workspace.exchange", crash)
        with pytest.raises(OSError, match="simulated crash"):
            exports.verify(ws, record.name, overrides=lenient)
    again = ws.get("export", record.name)
    assert again.status == "failed"
    manifest.verify(again.path)
    assert not [p for p in again.path.parent.iterdir() if p.name.startswith(".")
                and record.name in p.name]  # no staging copy left behind


def test_onnx_int4_export_generates_and_is_scored(smol_run: Workspace) -> None:
    from export.onnx import OnnxLM

    (record,) = exports.export_onnx(smol_run, "run", ["int4"], scratch=smol_run.root / "scratch")
    row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
    assert row["tokens_identical"] is True and row["kind"] == "int4"
    assert row["passed"] is True and record.status == "ready", row  # +10% on the demo run
    lm = OnnxLM(record.path / "onnx")
    ids = lm.tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    out = lm.generate(ids, 40, lm.stop_ids)
    assert 0 < len(out) < 40  # stopped on EOS before the limit


def test_bad_inputs_get_clear_errors(smol_run: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ApplianceError, match="no finished run named 'nope'"):
        exports.merge(smol_run, "nope")
    with pytest.raises(ValidationError, match="Q4_K_M"):
        exports.export_gguf(smol_run, "run", ["Q9_Z"], scratch=smol_run.root / "scratch")
    with pytest.raises(ValidationError, match="int4"):
        exports.export_onnx(smol_run, "run", ["int3"], scratch=smol_run.root / "scratch")

    from export import gguf

    def full_disk(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf, "quantize", full_disk)
    with pytest.raises(ApplianceError, match="disk is full"):
        exports.export_gguf(smol_run, "run", ["Q6_K"], scratch=smol_run.root / "scratch")
    assert not list((smol_run.root / "exports").glob(".staging-*"))
    assert not smol_run.artifact_dir("export", "run-gguf-q6_k").exists()


def test_tampered_export_is_not_reused(smol_run: Workspace) -> None:
    record = exports.merge(smol_run, "run")
    config = record.path / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b" ")
    try:
        with pytest.raises(IntegrityError):
            exports.merge(smol_run, "run")
    finally:
        config.write_bytes(original)


def test_missing_base_model_is_named(tmp_path: Path, smol_run: Workspace) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    shutil.copytree(smol_run.artifact_dir("run", "run"), ws.artifact_dir("run", "run"))
    ws.reconcile()
    with pytest.raises(ApplianceError, match="no longer in the workspace"):
        exports.merge(ws, "run")


def test_a_second_architecture_merges_and_exports_losslessly(tmp_path: Path, tiny_qwen2_source: Path
                                                              ) -> None:
    """Qwen2 family (attention biases, tied embeddings): F16 GGUF and fp32 ONNX pass their gates."""
    ws = Workspace(tmp_path / "ws")
    model = models.import_path(ws, tiny_qwen2_source, name="tiny-qwen2")
    run = _trained(ws, model, tmp_path)
    merged = exports.merge(ws, run)
    assert json.loads((merged.path / "merge_check.json").read_text())["max_abs_logit_diff"] < 1e-3
    (gguf_record,) = exports.export_gguf(ws, run, ["F16"], scratch=tmp_path / "scratch")
    (onnx_record,) = exports.export_onnx(ws, run, ["fp32"], scratch=tmp_path / "scratch")
    for record in (gguf_record, onnx_record):
        row = json.loads((record.path / "parity.json").read_text())["artifacts"][0]
        assert record.status == "ready", row
        assert row["tokens_identical"] is True and row["agreement"] > 0.97
