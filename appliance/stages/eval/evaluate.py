"""One evaluation end to end: the held-out items, each target's answers (kept item by item in the
job's folder, so a resumed job generates only what it lacks), the scores, the judge's verdicts
when one is asked for (`judge`: base vs each other target, both orders, kept item by item too),
and the `evals/<name>/` artifact: `eval.json` (settings, totals, deltas, flips, the judge's counts,
every item's scores and verdicts), `report.md`, `answers/NN-TARGET.jsonl` (and
`answers/judge-NN-TARGET.jsonl`) and a manifest whose parents are the targets and the dataset.

Targets are loaded one at a time and closed before the next (one model in memory at a time; the
GGUF engine and its scorer map the same file).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from appliance.errors import AlreadyExistsError, ApplianceError, ValidationError
from appliance.fsutil import sha256_file
from appliance.progress import QUIET, Reporter
from appliance.stages.eval import judge, metrics, results
from appliance.stages.eval.request import EvalRequest
from appliance.stages.eval.targets import Target, open_runner, resolve
from appliance.workspace import Workspace, parent_ref, slugify

Item = dict[str, Any]


def to_item(messages: list[dict[str, str]]) -> Item | None:
    """A conversation -> its prompt (every turn before the last assistant turn) and reference
    answer (that turn); None without an assistant turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not any(m["role"] == "user" for m in messages[:last]):
        return None
    return {"messages": messages[:last], "reference": messages[last]["content"]}


def scored(item: Item) -> list[dict[str, str]]:
    """The conversation whose reference answer's perplexity is scored: the prompt, then it."""
    return [*item["messages"], {"role": "assistant", "content": item["reference"]}]


def held_out(ws: Workspace, request: EvalRequest, targets: list[Target]
             ) -> tuple[dict[str, Any], list[Item]]:
    """(what the data is, for the report and lineage; the first `limit` items)."""
    from appliance.stages.datasets import importer as datasets

    if request.data and Path(request.data).is_absolute():
        path = Path(request.data)
        parsed = datasets.parse_file(path, "auto", lambda _: 0)
        rows = [r["messages"] for r in parsed.train]
        data = {"kind": "file", "name": path.name, "path": str(path), "sha256": sha256_file(path),
                "form": parsed.form, "rejected": len(parsed.rejected),
                "rejections": parsed.rejected[:20]}
    else:
        record = ws.get("dataset", request.data) if request.data else next(
            (t.dataset for t in targets if t.dataset is not None), None)
        if record is None:
            raise ValidationError("none of the targets was trained on a dataset, so there is no "
                                  "held-out split to default to", hint="name one: --data DATASET|FILE")
        rows = [r["messages"] for r in datasets.load_rows(record, "eval")]
        data = {"kind": "dataset", "name": record.name, "ref": parent_ref(record)}
    items = [i for i in map(to_item, rows) if i is not None][:request.limit]
    if not items:
        raise ApplianceError(f"{data['name']} has no held-out conversation with an assistant answer",
                             title="Nothing to evaluate",
                             hint="import the dataset with an eval split (--eval-fraction), or "
                                  "give a file: --data FILE")
    return data, items


def answer_all(ws: Workspace, target: Target, items: list[Item], log: results.ItemLog,
               request: EvalRequest, attempt: int, report: Reporter) -> None:
    """Generate and score every item `log` lacks, appending each as it finishes."""
    todo = [i for i in items if results.item_key(i) not in log.done]
    if len(todo) < len(items):
        report.log(f"{target.name}: {len(items) - len(todo)} of {len(items)} items already answered "
                   f"(kept from before), {len(todo)} to go")
    if not todo:
        return
    report.log(f"loading {target.name} ({target.record.kind}, {target.runtime})")
    runner = open_runner(ws, target, [i["messages"] for i in todo], request.max_new_tokens,
                         [scored(i) for i in todo])
    try:
        for item in todo:
            report.check_cancel()
            text, tokens, reason = runner.answer(item["messages"], request.max_new_tokens, request.seed)
            nll, count = runner.nll(scored(item))  # after answering: a GGUF engine reuses the prompt
            log.add({"key": results.item_key(item), "answer": text, "tokens": tokens,
                     "reason": reason, "nll": nll, "count": count, "attempt": attempt})
            report.progress(len(log.done), len(items), stage="generate", unit="items",
                            label=f"answering with {target.name}")
    finally:
        runner.close()


def score_target(target: Target, items: list[Item], log: results.ItemLog, tokenize: str
                 ) -> dict[str, Any]:
    """A target's row of the report: every item's answer and scores, and its totals."""
    entries = [log.done[results.item_key(i)] for i in items]
    scores = [metrics.item_scores(e["answer"], i["reference"], tokenize) for e, i in zip(
        entries, items, strict=True)]
    totals = metrics.corpus_scores([e["answer"] for e in entries], [i["reference"] for i in items],
                                   tokenize, scores)
    totals["ppl"] = results.perplexity(entries)
    totals["tokens"] = sum(e["tokens"] for e in entries) / len(entries)
    return {"name": target.name, "kind": target.record.kind, "artifact": target.record.name,
            "runtime": target.runtime, "parity": target.parity, "totals": totals,
            "stopped": sum(e["reason"] == "stop" for e in entries),
            "items": [{"answer": e["answer"], "tokens": e["tokens"], "reason": e["reason"],
                       "ppl": results.perplexity([e]), "scores": s}
                      for e, s in zip(entries, scores, strict=True)]}


def add_verdicts(rows: list[dict[str, Any]], items: list[Item], logs: list[results.ItemLog]) -> None:
    """Each non-base row gets its `judge` block and each of its items the judge's verdict; `logs`:
    the judge logs of rows[1:]."""
    for row, log in zip(rows[1:], logs, strict=True):
        verdicts = [judge.item_verdict(log.done[results.item_key(i)]) for i in items]
        for entry, verdict in zip(row["items"], verdicts, strict=True):
            entry["judge"] = verdict
        row["judge"] = judge.summary(verdicts)


def build_report(name: str, request: EvalRequest, data: dict[str, Any], items: list[Item],
                 rows: list[dict[str, Any]], tokenize: str,
                 judged: judge.JudgeSetup | None = None) -> dict[str, Any]:
    for row, delta in zip(rows, results.deltas([r["totals"] for r in rows]), strict=True):
        row["deltas"] = delta
        row["flips"] = results.flips([i["scores"] for i in rows[0]["items"]],
                                     [i["scores"] for i in row["items"]])
    return {"name": name, "items": len(items), "data": data, "targets": rows,
            "settings": {"max_new_tokens": request.max_new_tokens, "seed": request.seed,
                         "greedy": True, "bleu_tokenize": tokenize,
                         "rouge_tokens": "lowercased words of any alphabet, one token per "
                                         "character of Han, kana, Thai, Lao, Khmer, Myanmar",
                         "flip_thresholds": results.FLIP_THRESHOLDS,
                         "judge": judged.settings() if judged else None}}


def evaluate(ws: Workspace, request: EvalRequest, work: Path, *, default_name: str,
             attempt: int = 1, report: Reporter = QUIET) -> dict[str, Any]:
    """Run the evaluation, keeping per-item answers under `work`; the committed report."""
    name = request.name or default_name
    if ws.artifact_dir("eval", name).exists():
        raise AlreadyExistsError(f"eval {name!r} already exists",
                                 hint=f"pick another --name, or remove it (appliance evals rm {name})")
    targets = [resolve(ws, t) for t in request.targets]
    judged = judge.setup(ws, request.judge, request.rubric, report) if request.judge else None
    data, items = held_out(ws, request, targets)
    for rej in data.get("rejections", []):
        report.log(f"{data['name']} line {rej['line']}: {rej['reason']} (skipped)")
    if data.get("rejected", 0) > len(data.get("rejections", [])):
        report.log(f"... {data['rejected']} lines of {data['name']} skipped in all")
    report.log(f"{len(items)} held-out items of {data['name']}; targets: "
               + ", ".join(f"{t.name} ({t.runtime})" for t in targets))
    logs = [results.ItemLog(work / f"{n:02d}-{slugify(t.name)}.jsonl") for n, t in enumerate(targets)]
    for target, log in zip(targets, logs, strict=True):
        answer_all(ws, target, items, log, request, attempt, report)
    verdict_logs = [results.ItemLog(work / f"judge-{n:02d}-{slugify(t.name)}.jsonl")
                    for n, t in enumerate(targets) if n > 0] if judged else []
    if judged:
        setup = judged
        judge.judge_all(setup, lambda: judge.LlamaJudge(setup.path), items, logs[0],
                        [(t.name, log, v) for t, log, v in zip(targets[1:], logs[1:], verdict_logs,
                                                               strict=True)], attempt, report)
    tokenize = metrics.bleu_tokenizer([i["reference"] for i in items])
    rows = [score_target(t, items, log, tokenize) for t, log in zip(targets, logs, strict=True)]
    if judged:
        add_verdicts(rows, items, verdict_logs)
    doc = build_report(name, request, data, items, rows, tokenize, judged)
    report.log(results.table(doc))
    _commit(ws, name, request, doc, items, targets, logs + verdict_logs)
    return doc


def _commit(ws: Workspace, name: str, request: EvalRequest, doc: dict[str, Any], items: list[Item],
            targets: list[Target], logs: list[results.ItemLog]) -> None:
    parents = [parent_ref(t.record) for t in targets]
    if doc["data"].get("ref"):
        parents.append(doc["data"]["ref"])
    with ws.writer("eval", name) as w:
        (w.path / "eval.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
        (w.path / "report.md").write_text(results.markdown(doc, items), encoding="utf-8")
        (w.path / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n"
                                                    for i in items), encoding="utf-8")
        (w.path / "answers").mkdir()
        for log in logs:
            shutil.copyfile(log.path, w.path / "answers" / log.path.name)
        w.commit(parents=parents, config={**request.to_params(), "name": name},
                 info={"summary": {"targets": [t.name for t in targets], "data": doc["data"]["name"],
                                   "items": len(items)}},
                 metrics={r["name"]: {"totals": r["totals"], "deltas": r["deltas"],
                                      **({"judge": r["judge"]} if "judge" in r else {})}
                          for r in doc["targets"]})
