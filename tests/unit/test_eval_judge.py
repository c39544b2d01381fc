"""The eval judge without a model: verdicts mapped back to base/target for both orders, the
outcome when the orders disagree, the counts and agreement, how a verdict is read from next-token
logits, the rubric (default, a file, its errors naming the file), the request's judge fields,
the refusal of a judge that is not a GGUF, the judge's item log on resume (with a fake judge),
and the judge's lines in the table and the report."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.errors import NotFoundError, RefusedError, ValidationError
from appliance.progress import QUIET
from appliance.stages.eval import evaluate, judge, results, rubric
from appliance.stages.eval.request import EvalRequest
from appliance.workspace import Workspace


def test_each_order_maps_back_to_base_or_target() -> None:
    # order 0: A = base, B = target; order 1: A = target, B = base
    assert [judge.winner(0, x) for x in ("A", "B", "tie", None)] == ["base", "target", "tie", None]
    assert [judge.winner(1, x) for x in ("A", "B", "tie", None)] == ["target", "base", "tie", None]
    assert judge.outcome("target", "target") == "win" and judge.outcome("base", "base") == "loss"
    assert judge.outcome("tie", "tie") == "tie"
    assert judge.outcome("base", "target") == "inconsistent" == judge.outcome("tie", "base")
    assert judge.outcome(None, "base") == "skipped"


def _asked(label: str | None) -> dict[str, Any]:
    if label is None:
        return {"label": None, "reason": "overflow", "tokens": 9999}
    return {"label": label, "p": {k: 0.8 if k == label else 0.1 for k in judge.LABELS}, "mass": 1.0,
            "tokens": 10}


def test_an_item_is_won_only_when_both_orders_say_so_and_agreement_counts_the_rest() -> None:
    pairs = [("B", "A"), ("A", "B"), ("tie", "tie"), ("A", "A"), ("B", "B"), ("B", "A"), (None, "A")]
    verdicts = [judge.item_verdict({"orders": [_asked(a), _asked(b)]}) for a, b in pairs]
    assert [v["verdict"] for v in verdicts] == ["win", "loss", "tie", "inconsistent", "inconsistent",
                                                "win", "skipped"]
    assert verdicts[0]["order1"]["winner"] == "target" == verdicts[0]["order2"]["winner"]
    assert verdicts[3]["order1"]["winner"] == "base" and verdicts[3]["order2"]["winner"] == "target"
    assert [v["consistent"] for v in verdicts] == [True, True, True, False, False, True, None]
    assert judge.summary(verdicts) == {"wins": 2, "losses": 1, "ties": 1, "inconsistent": 2,
                                       "skipped": 1, "judged": 6, "agreed": 4, "agreement": 4 / 6}
    assert judge.summary([verdicts[-1]])["agreement"] is None  # nothing judged: no rate


def test_the_verdict_is_the_most_probable_label_summed_over_its_tokens() -> None:
    vocab = {"A": 1, " A": 2, "B": 3, " B": 4, " tie": 5, "Tie": 6, " Tie": 7, "t": 8, "ie": 9}

    def tokenize(text: str, special: bool = False) -> list[int]:
        return [0, vocab["t"], vocab["ie"]] if text == "tie" else [0, vocab[text]]  # 0: a BOS

    tokens = judge.label_tokens(tokenize, True, 0)
    assert tokens == {"A": [1, 2], "B": [3, 4], "tie": [5, 6, 7]}  # "t" of "t|ie" is left out
    logits = np.full(10, -1e9)
    logits[[1, 2, 3, 5, 8]] = [math.log(0.2), math.log(0.15), math.log(0.3), math.log(0.05),
                               math.log(0.3)]
    read = judge.read_verdict(logits, tokens)
    assert read["label"] == "A" and read["p"] == pytest.approx({"A": 0.35, "B": 0.3, "tie": 0.05})
    assert read["mass"] == pytest.approx(0.7)  # "t" holds the rest: not a label
    with pytest.raises(Exception, match="cannot tell the labels"):
        judge.label_tokens(lambda text, special=False: [7], False, 0)  # every spelling one token


def test_the_rubric_fills_once_and_a_bad_file_is_named(tmp_path: Path) -> None:
    default = rubric.load()
    assert default.origin == "default" and rubric.problem(default.text) is None
    assert default.sha256 == hashlib.sha256(default.text.encode()).hexdigest()
    filled = rubric.fill("Q {question} R {reference} A {answer_a} B {answer_b} {other}",
                         question="q", reference="r", answer_a="says {answer_b}", answer_b="b")
    assert filled == "Q q R r A says {answer_b} B b {other}"  # not filled again; unknown kept
    mine = tmp_path / "mine.md"
    mine.write_text("{question}\n1: {answer_a}\n2: {answer_b}\nA, B or tie?", encoding="utf-8")
    loaded = rubric.load(str(mine))
    assert loaded.origin == str(mine) and loaded.sha256 == hashlib.sha256(mine.read_bytes()).hexdigest()
    (tmp_path / "short.md").write_text("{question} {answer_a}", encoding="utf-8")
    (tmp_path / "latin1.md").write_bytes("{question} {answer_a} {answer_b} caf\xe9".encode("latin-1"))
    (tmp_path / "empty.md").write_text(" \n", encoding="utf-8")
    for name, why in [("short.md", r"lacks the placeholder\(s\) \{answer_b\}"),
                      ("latin1.md", "is not UTF-8 text"), ("empty.md", "is empty"),
                      ("missing.md", "does not exist")]:
        with pytest.raises(ValidationError, match=f"rubric {tmp_path / name} {why}"):
            rubric.load(str(tmp_path / name))


def test_the_request_carries_the_judge_and_older_params_have_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge.gguf").write_bytes(b"GGUF")
    (tmp_path / "rubric.md").write_text("{question} {answer_a} {answer_b}", encoding="utf-8")
    request = EvalRequest.make(["base", "run"], judge="judge.gguf", rubric="rubric.md")
    assert (request.judge, request.rubric) == (str(tmp_path / "judge.gguf"), str(tmp_path / "rubric.md"))
    assert request.problems() == {} and EvalRequest.from_params(request.to_params()) == request
    older = {"targets": ["a", "b"], "data": "", "limit": 4, "max_new_tokens": 8, "seed": 0, "name": None}
    assert EvalRequest.from_params(older) == EvalRequest(("a", "b"), limit=4, max_new_tokens=8)
    assert EvalRequest(("a", "b"), judge="smol").problems() == {}  # a name: resolved by the job
    assert EvalRequest(("a",), judge="smol").problems() == {
        "judge": "a judge compares each target with the first (the base): name at least two targets"}
    assert set(EvalRequest(("a", "b"), rubric=str(tmp_path / "rubric.md")).problems()) == {"rubric"}
    bad = EvalRequest(("a", "b"), judge="gone.gguf", rubric="/nowhere/rubric.md")
    assert set(bad.problems()) == {"judge", "rubric"}
    assert "gone.gguf does not exist" in bad.problems()["judge"]
    (tmp_path / "short.md").write_text("{question}", encoding="utf-8")
    short = EvalRequest(("a", "b"), judge="smol", rubric=str(tmp_path / "short.md"))
    assert short.problems()["rubric"].startswith(f"{tmp_path / 'short.md'} lacks the placeholder")


def test_a_judge_that_is_not_a_gguf_is_refused_in_one_line(workspace: Workspace, tmp_path: Path) -> None:
    workspace.ensure()
    onnx = tmp_path / "onnx-model"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"x")
    with pytest.raises(RefusedError, match=r"the judge must be a GGUF: '.*/onnx-model' is an ONNX model"):
        judge.resolve(workspace, str(onnx))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RefusedError, match=r"the judge must be a GGUF: .*notes\.txt is not a \.gguf file"):
        judge.resolve(workspace, str(tmp_path / "notes.txt"))
    with pytest.raises(NotFoundError, match="no export named 'nobody'"):
        judge.resolve(workspace, "nobody")


class FakeJudge:
    """Prefers the answer that says "good"; position-biased (always "A") when told to be."""

    def __init__(self, biased: bool = False) -> None:
        self.biased, self.asked, self.sized, self.closed = biased, [], 0, False

    def size(self, prompts: list[list[dict[str, str]]]) -> None:
        self.sized += 1

    def ask(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        text = messages[0]["content"]
        self.asked.append(text)
        a, b = text.split("ANSWER A: ")[1].split(" ANSWER B: ")
        label = "A" if self.biased or ("good" in a) > ("good" in b) else \
            "B" if ("good" in b) > ("good" in a) else "tie"
        return _asked(label)

    def close(self) -> None:
        self.closed = True


def _log(path: Path, answers: list[str], items: list[dict[str, Any]]) -> results.ItemLog:
    log = results.ItemLog(path)
    for item, answer in zip(items, answers, strict=True):
        log.add({"key": results.item_key(item), "answer": answer})
    return log


def _setup(text: str = "Q {question} ANSWER A: {answer_a} ANSWER B: {answer_b}") -> judge.JudgeSetup:
    return judge.JudgeSetup("fake", Path("/j.gguf"), "f" * 64, "unknown",
                            rubric.Rubric(text, hashlib.sha256(text.encode()).hexdigest(), "x.md"))


def _items(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}], "reference": f"r{i}"} for i in range(n)]


def test_both_orders_are_asked_and_a_resumed_job_asks_only_what_it_lacks(tmp_path: Path) -> None:
    items, setup = _items(4), _setup()
    base = _log(tmp_path / "00-base.jsonl", ["good", "meh", "same", "good"], items)
    tuned = _log(tmp_path / "01-tuned.jsonl", ["meh", "good", "same", "good"], items)
    verdicts = results.ItemLog(tmp_path / "judge-01-tuned.jsonl")
    fake = FakeJudge()
    verdicts.add({"key": results.item_key(items[0]), "judge_sha256": setup.sha256,  # done before
                  "rubric_sha256": setup.rubric.sha256, "orders": [_asked("A"), _asked("B")], "attempt": 1})
    verdicts.add({"key": results.item_key(items[1]), "judge_sha256": setup.sha256,  # another rubric
                  "rubric_sha256": "0" * 64, "orders": [_asked("A"), _asked("B")], "attempt": 1})
    judge.judge_all(setup, lambda: fake, items, base, [("tuned", tuned, verdicts)], 2, QUIET)
    assert fake.sized == 1 and fake.closed and len(fake.asked) == 6  # items 1-3, two orders each
    assert fake.asked[0] == "Q q1 ANSWER A: meh ANSWER B: good"  # order 1: the base is A
    assert fake.asked[1] == "Q q1 ANSWER A: good ANSWER B: meh"  # order 2: the target is A
    again = results.ItemLog(verdicts.path)
    got = [judge.item_verdict(again.done[results.item_key(i)])["verdict"] for i in items]
    assert got == ["loss", "win", "tie", "tie"]
    assert [json.loads(x)["attempt"] for x in verdicts.path.read_text().splitlines()] == [1, 1, 2, 2, 2]
    opened = []
    judge.judge_all(setup, lambda: opened.append(1) or fake, items, base, [("tuned", tuned, again)], 3, QUIET)
    assert opened == []  # all judged: the judge is not even loaded


def test_a_position_biased_judge_is_inconsistent_and_the_report_shows_it(tmp_path: Path) -> None:
    items, setup = _items(3), _setup()
    logs = [_log(tmp_path / f"{n}.jsonl", answers, items)
            for n, answers in enumerate([["good", "a", "b"], ["x", "good", "good"]])]
    verdicts = results.ItemLog(tmp_path / "judge.jsonl")
    judge.judge_all(setup, lambda: FakeJudge(biased=True), items, logs[0], [("tuned", logs[1], verdicts)],
                    1, QUIET)
    rows = [{"name": name, "runtime": "fake", "totals": {}, "items": [
        {"answer": log.done[results.item_key(i)]["answer"], "tokens": 1, "reason": "stop", "ppl": None,
         "scores": dict.fromkeys(("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact", "contains"), 0.0)}
        for i in items]} for name, log in (("base", logs[0]), ("tuned", logs[1]))]
    evaluate.add_verdicts(rows, items, [verdicts])
    assert rows[1]["judge"] == {"wins": 0, "losses": 0, "ties": 0, "inconsistent": 3, "skipped": 0,
                                "judged": 3, "agreed": 0, "agreement": 0.0}
    assert [i["judge"]["verdict"] for i in rows[1]["items"]] == ["inconsistent"] * 3
    assert "judge" not in rows[0]
    doc = evaluate.build_report("e", EvalRequest(("base", "tuned"), judge="fake"),
                                {"kind": "dataset", "name": "d"}, items, rows, "13a", setup)
    assert doc["settings"]["judge"]["sha256"] == "f" * 64
    assert doc["settings"]["judge"]["rubric_sha256"] == setup.rubric.sha256
    text = results.table(doc)
    assert "judge fake (asked twice per item, A and B swapped; rubric x.md):" in text
    assert "tuned vs base: 0 won, 0 lost, 0 tied, 3 inconsistent; the two orders agree on 0 of 3 (0%)" in text
    report = results.markdown(doc, items)
    assert "| tuned | 0 | 0 | 0 | 3 | 0 | 0 of 3 (0%) |" in report
    assert "| 0 | tuned | A = base (A 0.80, B 0.10, tie 0.10) | A = target (A 0.80, B 0.10, tie 0.10) | " \
           "inconsistent |" in report
    plain = [{k: v for k, v in r.items() if k != "judge"} for r in rows]
    no_judge = evaluate.build_report("e", EvalRequest(("base", "tuned")), {"kind": "dataset", "name": "d"},
                                     items, plain, "13a")
    assert no_judge["settings"]["judge"] is None and "judge" not in results.table(no_judge)


def test_the_cli_takes_a_judge_and_a_rubric_and_prints_the_default(
        capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import build_parser

    args = build_parser().parse_args(["eval", "base", "run", "--judge", "smol", "--rubric", "r.md"])
    assert (args.judge, args.rubric) == ("smol", "r.md")
    args = build_parser().parse_args(["evals", "rubric"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == rubric.default_text()
