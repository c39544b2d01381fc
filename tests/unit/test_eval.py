"""The eval stage without models: its request, its metrics on text in several scripts, the
per-item file a resumed job reads back (torn last line included), the skip of finished items
(with a fake runner), flips, deltas, and the summary table and Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from appliance import stages
from appliance.progress import QUIET
from appliance.stages.eval import evaluate, metrics, results
from appliance.stages.eval.request import EvalRequest, split_target


def test_the_request_round_trips_and_names_each_bad_field(tmp_path: Path) -> None:
    file = tmp_path / "held.jsonl"
    file.write_text("{}\n")
    request = EvalRequest.make(["base", "run:demo"], str(file), limit=4, max_new_tokens=32, name="x")
    assert request.data == str(file.resolve()) and request.problems() == {}
    assert EvalRequest.from_params(request.to_params()) == request
    assert EvalRequest.from_params({"targets": ["a"], "future_key": 1}) == EvalRequest(("a",))
    assert stages.REQUESTS["eval"] is EvalRequest and "eval" in stages.KINDS
    bad = EvalRequest(("a", "a"), "/nowhere.jsonl", limit=0, max_new_tokens=True, name="../x")
    assert set(bad.problems()) == {"targets", "data", "limit", "max_new_tokens", "name"}
    assert set(EvalRequest((), "bad name").problems()) == {"targets", "data"}
    assert split_target("run:demo") == ("run", "demo") and split_target("a:b") == (None, "a:b")


def test_rouge_matches_rouge_score_on_english_and_scores_chinese_that_rouge_score_drops() -> None:
    plain = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES))
    for answer, reference in [("The cat sat on the mat.", "A cat was sitting on the mat!"),
                              ("a b a b c", "b a b c a"), ("", "x y"), ("Paris, France", "paris")]:
        want = plain.score(reference, answer)
        got = metrics.rouge(answer, reference)
        assert got == pytest.approx({k: want[k].fmeasure for k in metrics.ROUGE_TYPES}, abs=1e-12)
    zh = ("北京是中国的首都", "中国的首都是北京")
    assert plain.score(*zh)["rouge1"].fmeasure == 0.0  # rouge-score keeps only [a-z0-9]
    assert metrics.rouge(*zh)["rouge1"] == 1.0  # the same characters, in another order
    ours = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), tokenizer=metrics.RougeTokenizer())
    assert metrics.rouge(*zh)["rougeL"] == pytest.approx(ours.score(zh[1], zh[0])["rougeL"].fmeasure)
    assert metrics.rouge_tokens("Größe café 東京タワー ok_2") == [
        "größe", "café", "東", "京", "タ", "ワ", "ー", "ok", "2"]


def test_bleu_picks_a_tokenizer_for_the_script_and_matches_sacrebleu() -> None:
    assert metrics.bleu_tokenizer(["an English answer"]) == "13a"
    assert metrics.bleu_tokenizer(["中文回答", "english"]) == "zh"
    assert metrics.bleu_tokenizer(["東京タワー"]) == "char"
    assert metrics.bleu_tokenizer(["ภาษาไทย"]) == "char"
    scores = metrics.item_scores("北京是首都", "北京是中国的首都", "zh")
    assert scores["bleu"] == pytest.approx(
        sacrebleu.sentence_bleu("北京是首都", ["北京是中国的首都"], tokenize="zh").score)
    assert scores["bleu"] > sacrebleu.sentence_bleu("北京是首都", ["北京是中国的首都"]).score  # 13a: one word
    assert scores["chrf"] == pytest.approx(sacrebleu.sentence_chrf("北京是首都", ["北京是中国的首都"]).score)


def test_exact_and_contains_ignore_case_and_spacing() -> None:
    assert metrics.item_scores(" Paris\n", "paris", "13a")["exact"] == 1.0
    assert metrics.item_scores("It is Paris, France.", "paris,  france", "13a")["contains"] == 1.0
    assert metrics.item_scores("Lyon", "Paris", "13a")["contains"] == 0.0
    assert metrics.item_scores("anything", "", "13a")["contains"] == 0.0


def test_the_item_log_reads_back_and_drops_a_line_the_kill_cut_short(tmp_path: Path) -> None:
    log = results.ItemLog(tmp_path / "t.jsonl")
    log.add({"key": "a", "answer": "x"})
    log.add({"key": "b", "answer": "y"})
    with open(log.path, "a") as fh:
        fh.write('{"key": "c", "ans')  # kill -9 mid-write
    again = results.ItemLog(log.path)
    assert set(again.done) == {"a", "b"}
    again.add({"key": "c", "answer": "z"})
    assert [json.loads(x)["key"] for x in log.path.read_text().splitlines()] == ["a", "b", "c"]


class FakeRunner:
    """Counts its generations; answers with the prompt's last word."""

    def __init__(self) -> None:
        self.answered: list[str] = []
        self.closed = False

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int, seed: int) -> tuple[str, int, str]:
        self.answered.append(messages[-1]["content"])
        return messages[-1]["content"].split()[-1], 1, "stop"

    def nll(self, conversation: list[dict[str, str]]) -> tuple[float, int]:
        return 2.0, 2

    def close(self) -> None:
        self.closed = True


def _items(n: int) -> list[dict[str, Any]]:
    return [evaluate.to_item([{"role": "user", "content": f"say word{i}"},
                              {"role": "assistant", "content": f"word{i}"}]) for i in range(n)]  # type: ignore[misc]


def test_finished_items_are_not_answered_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = FakeRunner()
    monkeypatch.setattr(evaluate, "open_runner", lambda *a: runner)
    target: Any = type("T", (), {"name": "t", "runtime": "fake", "record": type("R", (), {"kind": "model"})})
    items, request = _items(5), EvalRequest(("t",), max_new_tokens=4)
    log = results.ItemLog(tmp_path / "t.jsonl")
    for item in items[:3]:  # what a first attempt finished before it was killed
        log.add({"key": results.item_key(item), "answer": "old", "tokens": 1, "reason": "stop",
                 "nll": 1.0, "count": 1, "attempt": 1})
    evaluate.answer_all(None, target, items, results.ItemLog(log.path), request, 2, QUIET)  # type: ignore[arg-type]
    assert runner.answered == ["say word3", "say word4"] and runner.closed
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert [x["attempt"] for x in lines] == [1, 1, 1, 2, 2]
    runner.answered.clear()
    evaluate.answer_all(None, target, items, results.ItemLog(log.path), request, 3, QUIET)  # type: ignore[arg-type]
    assert runner.answered == []  # all done: the model is not even loaded


def test_to_item_keeps_earlier_turns_and_takes_the_last_answer() -> None:
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert evaluate.to_item(chat) == {"messages": chat[:4], "reference": "a2"}
    assert evaluate.to_item(chat[:2]) is None


def _row(name: str, chrf: list[float], ppl: float) -> dict[str, Any]:
    items = [{"answer": f"a|{i}\nb", "tokens": 3, "reason": "stop", "ppl": ppl,
              "scores": {"rouge1": c / 100, "rouge2": 0.0, "rougeL": c / 100, "bleu": c, "chrf": c,
                         "exact": 0.0, "contains": float(c > 50)}} for i, c in enumerate(chrf)]
    totals = {"ppl": ppl, "rouge1": sum(chrf) / 300, "rouge2": 0.0, "rougeL": sum(chrf) / 300,
              "bleu": sum(chrf) / 3, "chrf": sum(chrf) / 3, "exact": 0.0, "contains": 0.0, "tokens": 3.0}
    return {"name": name, "runtime": "fake", "items": items, "totals": totals}


def test_flips_deltas_table_and_report() -> None:
    rows = [_row("base", [40, 40, 40], 10.0), _row("tuned", [60, 35, 10], 8.0)]
    doc = evaluate.build_report("e", EvalRequest(("base", "tuned")), {"kind": "dataset", "name": "d"},
                                [{"messages": [{"role": "user", "content": "q|?"}], "reference": "r"}] * 3,
                                rows, "13a")
    tuned = doc["targets"][1]
    assert tuned["flips"]["chrf"] == {"better": [0], "worse": [2]}  # item 1 moved 5 < 10: no flip
    assert tuned["flips"]["contains"] == {"better": [0], "worse": []}
    assert tuned["deltas"]["ppl"] == pytest.approx(-2.0) and tuned["deltas"]["chrf"] == pytest.approx(-5.0)
    text = results.table(doc)
    assert "tuned vs base: chrf better on 1 item(s) (#0), worse on 1 item(s) (#2)" in text
    assert "8.000 (-2.000)" in text and "35.0 (-5.0)" in text
    report = results.markdown(doc, [{"messages": [{"role": "user", "content": "q|?"}], "reference": "r"}] * 3)
    assert "| tuned | fake |" in report and "q\\|?" in report and "a\\|0 b (chrF 60.0)" in report
    assert "no item moved past a threshold" in results.table({**doc, "targets": [rows[0], {
        **rows[0], "name": "same", "flips": results.flips(*[[i["scores"] for i in rows[0]["items"]]] * 2),
        "deltas": doc["targets"][0]["deltas"]}]})


def test_the_cli_parses_targets_and_an_edge_install_refuses_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import api
    from appliance.cli import build_parser
    from appliance.cli.eval import cmd_eval
    from appliance.errors import RefusedError

    args = build_parser().parse_args(["eval", "base", "run:demo", "--limit", "4", "--max-new-tokens", "8"])
    assert (args.func, args.targets, args.limit, args.max_new_tokens) == (
        cmd_eval, ["base", "run:demo"], 4, 8)
    assert build_parser().parse_args(["evals", "list"]).func.__name__ == "cmd_evals_list"
    monkeypatch.setenv("APPLIANCE_PROFILE", "edge")
    with pytest.raises(RefusedError, match="evaluation needs the full profile"):
        api.check("eval", EvalRequest(("base",)).to_params())
