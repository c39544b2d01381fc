"""`appliance eval` on the real SmolLM2: the base model, a short QLoRA run on the demo's Dolly data
and its Q8_0 GGUF answer 16 held-out items through their own runtimes (transformers, peft,
llama.cpp); every metric is checked against rouge-score and sacrebleu called directly on the same
strings, the flips against the per-item scores; a job killed with -9 resumes without
generating again the items it had finished; and SmolLM2's own GGUF judges the base against the
GGUF through llama.cpp, its verdict blocks complete and consistent with the per-item verdicts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from appliance import api, jobs, manifest
from appliance.demo import sample_dataset
from appliance.errors import RefusedError
from appliance.stages.datasets import importer as datasets
from appliance.stages.eval import judge, metrics, results, rubric
from appliance.stages.eval.request import EvalRequest
from appliance.stages.export import convert
from appliance.workspace import ArtifactRecord, Workspace
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
TRAIN = {"lora_r": 4, "lora_alpha": 8, "max_steps": 2, "batch_size": 2, "grad_accum": 1,
         "max_seq_len": 192, "warmup_steps": 1, "learning_rate": 1e-3, "eval_every": 2,
         "save_every": 2, "eval_batches": 1, "seed": 1}
ITEMS, MAX_NEW = 16, 16


@pytest.fixture(scope="module")
def eval_ws(module_tmp: ModuleTemp, smol_model: ArtifactRecord) -> Workspace:
    """SmolLM2, 80 Dolly conversations (16 held out), a 2-step run on them and its Q8_0 GGUF."""
    tmp = module_tmp.mktemp("eval")
    ws = Workspace(tmp / "ws").ensure()
    shutil.copytree(smol_model.path, ws.artifact_dir("model", smol_model.name))
    ws.reconcile()
    lines = sample_dataset().read_text(encoding="utf-8").splitlines()[:80]
    (tmp / "dolly.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    datasets.import_file(ws, tmp / "dolly.jsonl", ws.get("model", smol_model.name), name="dolly",
                         eval_fraction=0.2)
    job = jobs.submit(ws, "train", {"model": smol_model.name, "dataset": "dolly", "config": TRAIN,
                                    "source": "test", "name": "run"})
    assert api.run(ws, job.id).state == "succeeded", jobs.get(ws, job.id).message
    convert.export_gguf(ws, "run", ["q8_0"], scratch=tmp / "scratch")
    return ws


def _run_eval(ws: Workspace, request: EvalRequest) -> tuple[jobs.Job, dict[str, Any]]:
    job = api.run(ws, api.submit(ws, request.kind, request.to_params()).id)
    assert job.state == "succeeded", job.message
    record = ws.get("eval", job.result["eval"])
    return job, json.loads((record.path / "eval.json").read_text(encoding="utf-8"))


def _check_against_the_libraries(doc: dict[str, Any], items: list[dict[str, Any]]) -> None:
    ours = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), tokenizer=metrics.RougeTokenizer())
    plain = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES))  # rouge-score's own tokenizer
    references = [i["reference"] for i in items]
    for row in doc["targets"]:
        answers = [i["answer"] for i in row["items"]]
        for answer, reference, item in zip(answers, references, row["items"], strict=True):
            for scorer in (ours, plain) if (answer + reference).isascii() else (ours,):
                want = scorer.score(reference, answer)
                for key in metrics.ROUGE_TYPES:
                    assert item["scores"][key] == pytest.approx(want[key].fmeasure, abs=1e-12)
            assert item["scores"]["bleu"] == pytest.approx(
                sacrebleu.sentence_bleu(answer, [reference]).score, abs=1e-9)
            assert item["scores"]["chrf"] == pytest.approx(
                sacrebleu.sentence_chrf(answer, [reference]).score, abs=1e-9)
        assert row["totals"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score)
        assert row["totals"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(answers, [references]).score)


def test_base_run_and_gguf_answer_and_are_scored_like_the_libraries_score(eval_ws: Workspace) -> None:
    model = eval_ws.list("model")[0].name
    request = EvalRequest((model, "run", "run-gguf-q8_0"), limit=ITEMS, max_new_tokens=MAX_NEW,
                          name="before-after")
    job, doc = _run_eval(eval_ws, request)
    record = eval_ws.get("eval", "before-after")
    data = manifest.verify(record.path)
    assert {(p["kind"], p["name"]) for p in data["parents"]} == {
        ("model", model), ("run", "run"), ("export", "run-gguf-q8_0"), ("dataset", "dolly")}
    assert [r["runtime"] for r in doc["targets"]] == ["transformers", "transformers+peft", "llama.cpp"]
    items = [json.loads(line) for line in (record.path / "items.jsonl").read_text().splitlines()]
    assert doc["items"] == len(items) == ITEMS and doc["settings"]["bleu_tokenize"] == "13a"
    for row in doc["targets"]:
        assert len(row["items"]) == ITEMS and sum(bool(i["answer"].strip()) for i in row["items"]) >= 12
        assert all(0 < i["tokens"] <= MAX_NEW for i in row["items"])
        scored = [i["ppl"] for i in row["items"] if i["ppl"] is not None]  # None: answer past 1024 tokens
        assert 1 < row["totals"]["ppl"] < 100 and len(scored) >= 12 and all(p > 1 for p in scored)
    _check_against_the_libraries(doc, items)
    base = [i["scores"] for i in doc["targets"][0]["items"]]
    for row in doc["targets"][1:]:
        for metric, limit in results.FLIP_THRESHOLDS.items():
            moved = [t["scores"][metric] - b[metric] for b, t in zip(base, row["items"], strict=True)]
            assert row["flips"][metric]["better"] == [i for i, d in enumerate(moved) if d >= limit]
            assert row["flips"][metric]["worse"] == [i for i, d in enumerate(moved) if d <= -limit]
        base_chrf = doc["targets"][0]["totals"]["chrf"]
        assert row["deltas"]["chrf"] == pytest.approx(row["totals"]["chrf"] - base_chrf)
    text = results.table(doc)
    assert text in "\n".join(e["message"] for e in jobs.read_events(eval_ws, job.id) if e["type"] == "log")
    report = (record.path / "report.md").read_text(encoding="utf-8")
    assert "| run-gguf-q8_0 | llama.cpp |" in report and report.count("\n| ") >= 3 + ITEMS


def _lines(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a per-item file (a line the kill cut short is not one)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def test_a_job_killed_with_9_resumes_without_answering_finished_items_again(
        eval_ws: Workspace, stop_jobs_after: Any) -> None:
    stop_jobs_after(eval_ws)
    request = EvalRequest(("run-gguf-q8_0",), limit=8, max_new_tokens=MAX_NEW, name="resumed")
    job = api.start(eval_ws, request.kind, request.to_params())
    log = jobs.job_dir(eval_ws, job.id) / "eval" / "00-run-gguf-q8_0.jsonl"
    deadline = time.monotonic() + 300
    while len(_lines(log)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(jobs.get(eval_ws, job.id).pid, signal.SIGKILL)
    kept = _lines(log)
    assert 2 <= len(kept) < 8, "the job should be killed halfway"
    while jobs.get(eval_ws, job.id).state != "interrupted" and time.monotonic() < deadline:
        time.sleep(0.1)
    jobs.resume(eval_ws, job.id)
    while jobs.get(eval_ws, job.id).state not in jobs.TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
    done = jobs.get(eval_ws, job.id)
    assert (done.state, done.attempt) == ("succeeded", 2), done.message
    lines = _lines(log)
    assert len(lines) == 8 == len({line["key"] for line in lines})  # each item answered once
    assert lines[:len(kept)] == kept and all(line["attempt"] == 2 for line in lines[len(kept):])
    logs = [e["message"] for e in jobs.read_events(eval_ws, job.id) if e["type"] == "log"]
    assert f"run-gguf-q8_0: {len(kept)} of 8 items already answered (kept from before), " \
           f"{8 - len(kept)} to go" in logs
    answers = _lines(eval_ws.get("eval", "resumed").path / "answers" / "00-run-gguf-q8_0.jsonl")
    assert answers == lines and not math.isnan(answers[0]["nll"])


def test_a_gguf_judges_base_against_target_in_both_orders(eval_ws: Workspace) -> None:
    """Not the quality of a 135M judge's opinion: that every item was asked in both orders through
    llama.cpp, each verdict follows from its probabilities, and the counts from the verdicts."""
    model = eval_ws.list("model")[0]
    with pytest.raises(RefusedError, match="the judge must be a GGUF: 'run' is a run"):
        judge.resolve(eval_ws, "run")
    request = EvalRequest((model.name, "run-gguf-q8_0"), limit=3, max_new_tokens=MAX_NEW,
                          name="judged", judge=model.name)
    job, doc = _run_eval(eval_ws, request)
    gguf = model.path / manifest.read(model.path)["info"]["gguf_file"]
    settings = doc["settings"]["judge"]
    assert settings["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert (settings["rubric"], settings["rubric_sha256"]) == (
        "default", hashlib.sha256(rubric.default_text().encode()).hexdigest())
    base, target = doc["targets"]
    assert "judge" not in base and all("judge" not in i for i in base["items"])
    verdicts = [i["judge"] for i in target["items"]]
    for v in verdicts:
        for n, asked in enumerate((v["order1"], v["order2"])):
            assert asked["label"] in judge.LABELS and 0 < asked["mass"] <= 1 and asked["tokens"] > 50
            assert asked["mass"] == pytest.approx(sum(asked["p"].values()), abs=1e-5)
            assert asked["label"] == max(judge.LABELS, key=lambda k: asked["p"][k])
            assert asked["winner"] == judge.winner(n, asked["label"])
        assert v["verdict"] == judge.outcome(v["order1"]["winner"], v["order2"]["winner"])
        assert v["consistent"] == (v["verdict"] != "inconsistent")
    block = target["judge"]
    counted = [sum(v["verdict"] == o for v in verdicts) for o in ("win", "loss", "tie", "inconsistent")]
    assert [block["wins"], block["losses"], block["ties"], block["inconsistent"]] == counted
    assert block["skipped"] == 0 and block["judged"] == 3 == sum(counted)
    assert block["agreement"] == pytest.approx((3 - block["inconsistent"]) / 3)
    record = eval_ws.get("eval", "judged")
    lines = _lines(record.path / "answers" / "judge-01-run-gguf-q8_0.jsonl")
    assert lines == _lines(jobs.job_dir(eval_ws, job.id) / "eval" / "judge-01-run-gguf-q8_0.jsonl")
    assert len(lines) == 3 and all(len(line["orders"]) == 2 for line in lines)
    assert manifest.read(record.path)["metrics"]["run-gguf-q8_0"]["judge"] == block
    logs = "\n".join(e["message"] for e in jobs.read_events(eval_ws, job.id) if e["type"] == "log")
    assert results.judge_line(model.name, target) in logs
    assert "## Judge" in (record.path / "report.md").read_text(encoding="utf-8")
