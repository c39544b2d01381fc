"""Dataset parsing, conversion, validation, dedup, split and stats, with a fake word-count measure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.stages.datasets import importer as datasets
from appliance.stages.datasets.importer import Messages, Rejected

LIMIT = 20


def words(messages: Messages) -> int:
    n = sum(len(m["content"].split()) for m in messages)
    if n > LIMIT:
        raise Rejected("too_long", f"longer than the context: {n} words > {LIMIT}")
    return n


def write(tmp_path: Path, lines: list[bytes | dict[str, Any]]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n"
                              for x in lines))
    return path


def msgs(*turns: tuple[str, Any]) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}).encode()


def conv(*turns: tuple[str, str]) -> Messages:
    return [{"role": r, "content": c} for r, c in turns]


GOOD = msgs(("user", "Hi"), ("assistant", "Hello"))


@pytest.mark.parametrize(("obj", "form", "expected"), [
    ({"messages": conv(("system", "S"), ("user", "Q"), ("assistant", "R"))}, "messages",
     conv(("system", "S"), ("user", "Q"), ("assistant", "R"))),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                        {"from": "gpt", "value": "R"}]}, "sharegpt",
     conv(("system", "S"), ("user", "Q"), ("assistant", "R"))),
    ({"instruction": "Q", "output": "R"}, "alpaca", conv(("user", "Q"), ("assistant", "R"))),
    ({"instruction": "Q", "input": "X", "output": "R"}, "alpaca",
     conv(("user", "Q\n\nX"), ("assistant", "R"))),
    ({"instruction": "Q", "response": "R"}, "dolly", conv(("user", "Q"), ("assistant", "R"))),
    ({"instruction": "Q", "context": "", "response": "R"}, "dolly",
     conv(("user", "Q"), ("assistant", "R"))),
    ({"instruction": "Q", "context": "C", "response": "R"}, "dolly",
     conv(("user", "Q\n\nC"), ("assistant", "R"))),
])
def test_each_form_is_detected_and_converted(obj: dict[str, Any], form: str, expected: Messages,
                                             tmp_path: Path) -> None:
    assert datasets.detect_form(obj) == form
    assert datasets.convert(obj, form) == expected
    result = datasets.parse_file(write(tmp_path, [obj]), "auto", words)
    assert result.form == form
    assert [r["messages"] for r in result.train] == [expected]


def test_undetectable_first_record_is_rejected_listing_the_forms(tmp_path: Path) -> None:
    path = write(tmp_path, [{"question": "Q", "answer": "A"}, {"instruction": "Q", "output": "R"}])
    result = datasets.parse_file(path, "auto", words)
    [rej] = result.rejected
    assert (rej["line"], rej["code"]) == (1, "missing_field")
    assert all(form in rej["reason"] for form in datasets.FORMS)
    assert result.form == "alpaca"
    assert [r["line"] for r in result.train] == [2]


def test_check_conversation_directly() -> None:
    datasets.check_conversation(conv(("system", "S"), ("user", "Q"), ("assistant", "R")))
    with pytest.raises(Rejected) as exc:
        datasets.check_conversation([])
    assert exc.value.code == "missing_field"
    with pytest.raises(Rejected) as exc:
        datasets.check_conversation(conv(("system", "S"), ("system", "T"), ("user", "Q"), ("assistant", "R")))
    assert exc.value.code == "role_order" and "message 2 is 'system'" in exc.value.reason


BAD_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
MESSAGES_CASES: list[tuple[bytes, str, str]] = [
    (b'{"messages": [', "bad_json", "bad JSON"),
    (b"[1, 2]", "bad_json", "expected an object, got list"),
    (BAD_UTF8, "not_utf8", f"byte 0xe9 at column {BAD_UTF8.index(0xE9) + 1}"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "missing_field",
     "missing field 'content' in message 1"),
    (msgs(("tool", "x"), ("assistant", "y")), "unknown_role", "unknown role 'tool' in message 1"),
    (msgs(("user", "  \t "), ("assistant", "y")), "empty_content", "empty content in message 1"),
    (msgs(("assistant", "y"), ("user", "x")), "role_order", "message 1 is 'assistant'"),
    (msgs(("user", "a"), ("user", "b"), ("assistant", "c")), "role_order", "message 2 is 'user'"),
    (msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "role_order", "end with an assistant"),
    (msgs(("user", "a"), ("system", "s"), ("assistant", "b")), "role_order", "message 2 is 'system'"),
    (msgs(("user", "word " * 30), ("assistant", "b")), "too_long", "31 words > 20"),
    (msgs(("user", 5), ("assistant", "b")), "wrong_type", "'content' in message 1 must be a string"),
    (b"", "empty_line", "empty line"),
    (b"  \r", "empty_line", "empty line"),
]


def test_every_rejection_has_its_line_and_code(tmp_path: Path) -> None:
    lines = [GOOD] + [case[0] for case in MESSAGES_CASES] + [msgs(("user", "x"), ("assistant", "y"))]
    result = datasets.parse_file(write(tmp_path, lines), "auto", words)
    assert result.lines == len(lines)
    got = [(r["line"], r["code"]) for r in result.rejected]
    assert got == [(i, code) for i, (_, code, _) in enumerate(MESSAGES_CASES, start=2)]
    for rej, (_, _, fragment) in zip(result.rejected, MESSAGES_CASES):
        assert fragment in rej["reason"], rej
    assert [r["line"] for r in result.train] == [1, len(lines)]
    assert len(result.train) + len(result.duplicates) + len(result.rejected) == result.lines


@pytest.mark.parametrize(("good", "bad", "code", "fragment"), [
    ({"instruction": "Q", "output": "R"}, {"instruction": "Q2"}, "missing_field", "'output'"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "R"}]},
     {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "R"}]},
     "unknown_role", "unknown role 'bot' in turn 2"),
    ({"instruction": "Q", "response": "R"}, {"instruction": "Q", "response": 7}, "wrong_type",
     "'response' must be a string, got int"),
])
def test_form_specific_rejections(good: dict[str, Any], bad: dict[str, Any], code: str, fragment: str,
                                  tmp_path: Path) -> None:
    result = datasets.parse_file(write(tmp_path, [good, b"", bad]), "auto", words)
    assert [(r["line"], r["code"]) for r in result.rejected] == [(2, "empty_line"), (3, code)]
    assert fragment in result.rejected[1]["reason"]
    assert len(result.train) + len(result.duplicates) + len(result.rejected) == result.lines == 3


def test_exact_duplicates_are_removed_pointing_at_the_first(tmp_path: Path) -> None:
    reordered = json.dumps({"messages": [{"content": "Hello there", "role": "user"},
                                         {"content": "Hi", "role": "assistant"}]}).encode()
    lines = [msgs(("user", "Hello there"), ("assistant", "Hi")), GOOD,
             msgs(("user", "Hello there"), ("assistant", "Hi")),
             msgs(("user", "Hello  there"), ("assistant", "Hi")), reordered, GOOD]
    result = datasets.parse_file(write(tmp_path, lines), "auto", words)
    assert result.duplicates == [{"line": 3, "duplicate_of": 1}, {"line": 5, "duplicate_of": 1},
                                 {"line": 6, "duplicate_of": 2}]
    assert [r["line"] for r in result.train] == [1, 2, 4]
    assert result.rejected == []


ROWS = [{"line": i} for i in range(1, 201)]


def test_split_is_deterministic_and_seed_dependent() -> None:
    train, eval_ = datasets.split(ROWS, 0.1, seed=7)
    assert datasets.split(ROWS, 0.1, seed=7) == (train, eval_)
    assert len(eval_) == 20 and len(train) == 180
    assert sorted(r["line"] for r in train + eval_) == list(range(1, 201))
    for part in (train, eval_):
        assert [r["line"] for r in part] == sorted(r["line"] for r in part)
    other = datasets.split(ROWS, 0.1, seed=8)[1]
    assert {r["line"] for r in other} != {r["line"] for r in eval_}


@pytest.mark.parametrize(("n", "fraction", "n_eval"), [
    (200, 0.1, 20), (10, 0.25, round(2.5)), (10, 0.3, 3), (2, 0.1, 1), (3, 0.01, 1), (10, 0.99, 9),
    (10, 0.0, 0), (1, 0.1, 0),
])
def test_split_sizes(n: int, fraction: float, n_eval: int) -> None:
    rows = ROWS[:n]
    train, eval_ = datasets.split(rows, fraction, seed=0)
    assert len(eval_) == n_eval
    assert len(train) == n - n_eval
    if fraction == 0:
        assert train == rows


def test_split_never_empties_train() -> None:
    train, eval_ = datasets.split(ROWS[:1], 0.6, seed=0)
    assert train == ROWS[:1] and eval_ == []


def test_length_stats() -> None:
    stats = datasets.length_stats([5, 1, 9, 3, 100])
    assert {k: stats[k] for k in ("count", "total", "min", "max", "p50", "p95", "mean")} == {
        "count": 5, "total": 118, "min": 1, "max": 100, "p50": 5, "p95": 100, "mean": 23.6}
    hist = stats["histogram"]
    assert len(hist) == 10 and (hist[0]["from"], hist[0]["to"]) == (0, 10)
    assert [h["count"] for h in hist] == [4, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert sum(h["count"] for h in datasets.length_stats(list(range(37)))["histogram"]) == 37
    assert datasets.length_stats([]) == {"count": 0}


# -- lines that once stopped the whole import ------------------------------------------------------
NESTED = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
NASTY: list[tuple[bytes, str | None, str]] = [  # line, rejection code (None: kept), reason fragment
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "x"}]}',
     "bad_text", "message 1 (user) is not valid Unicode text: a lone surrogate \\ud800 at character 2"),
    (b'{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\\udfff"}]}',
     "bad_text", "message 2 (assistant)"),
    (b'{"messages": [{"role": "\\ud800", "content": "Q"}]}', "unknown_role", "'\\ud800'"),
    (NESTED, "bad_json", "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b'}]}', "wrong_type",
     "'content' in message 1 must be a string, got list"),
    (b'{"messages": [], "n": ' + b"9" * 5000 + b"}", "bad_json", "bad JSON: "),
    (b'{"messages": [{"role": "user", "content": 1' + b"0" * 400 + b'}]}', "wrong_type", "got int"),
    (b'{"messages": [{"role": "user", "content": -1e999}]}', "wrong_type", "got float"),
    (b'{"messages": [{"role": "user", "content": NaN}]}', "wrong_type", "got float"),
    (msgs(("user", "Q1"), ("assistant", "R"))[:-1] + b', "score": NaN, "big": 1e999}', None, ""),
    (b"\xef\xbb\xbf" + msgs(("user", "Q2"), ("assistant", "R")), None, ""),  # a BOM
    (msgs(("user", "Q3"), ("assistant", "R")) + b"\r", None, ""),  # CRLF
    (msgs(("user", "Q4\x00"), ("assistant", "R")).replace(b"\\u0000", b"\x00"), "bad_json",
     "Invalid control character"),
    (msgs(("user", "Q5\x00"), ("assistant", "R")), None, ""),  # an escaped NUL is text
    (b"null", "bad_json", "expected an object, got NoneType"),
    (b'"text"', "bad_json", "expected an object, got str"),
    (b"3", "bad_json", "expected an object, got int"),
    (b'{"messages": [{"role": "' + b"r" * 100_000 + b'", "content": "x"}]}', "unknown_role", "..."),
]


def test_any_bad_line_is_rejected_alone_and_the_rest_imported(tmp_path: Path) -> None:
    lines = [GOOD, *(line for line, _, _ in NASTY), msgs(("user", "last"), ("assistant", "one"))]
    result = datasets.parse_file(write(tmp_path, lines), "auto", words)
    expected = [(i, code) for i, (_, code, _) in enumerate(NASTY, start=2) if code]
    assert [(r["line"], r["code"]) for r in result.rejected] == expected
    for rej, (_, code, fragment) in zip(result.rejected, [c for c in NASTY if c[1]], strict=True):
        assert fragment in rej["reason"] and len(rej["reason"]) < 300, (code, rej["reason"][:300])
    kept = [1, *(i for i, (_, code, _) in enumerate(NASTY, start=2) if code is None), len(lines)]
    assert [r["line"] for r in result.train] == kept
    assert result.train[-2]["messages"][0]["content"] == "Q5\x00"
    rows = result.train + [{"rejected": r} for r in result.rejected]
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")  # everything kept or reported can be written


def test_a_huge_line_is_skipped_unread_and_the_rest_imported(tmp_path: Path) -> None:
    import tracemalloc

    huge = b'{"instruction": "' + b"x" * 50_000_000 + b'", "response": "R"}'
    path = write(tmp_path, [GOOD, huge, msgs(("user", "next"), ("assistant", "line")),
                            msgs(("user", "y" * 1_000), ("assistant", "R"))])
    with open(path, "ab") as fh:
        fh.write(huge[:3_000_000])  # the last line, without a newline
    seen: list[int] = []

    def measure(messages: Messages) -> int:
        seen.append(sum(len(m["content"]) for m in messages))
        return 1

    tracemalloc.start()
    try:
        result = datasets.parse_file(path, "auto", measure, max_line_bytes=2_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"parsing held {peak:,} bytes"  # the 50 MB line was never held
    assert [(r["line"], r["code"]) for r in result.rejected] == [(2, "too_long"), (5, "too_long")]
    assert result.rejected[0]["reason"].startswith(f"line of {len(huge):,} bytes: longer than")
    assert "(at most 2,000 bytes); not parsed" in result.rejected[0]["reason"]
    assert result.rejected[1]["reason"].startswith("line of 3,000,000 bytes")  # no final newline
    assert [r["line"] for r in result.train] == [1, 3, 4] and max(seen) < 2_000


def test_line_length_bound_is_exact(tmp_path: Path) -> None:
    line = b'{"instruction": "Q", "response": "R"}'
    for limit, kept in ((len(line), True), (len(line) - 1, False)):
        result = datasets.parse_file(write(tmp_path, [line]), "auto", words, max_line_bytes=limit)
        assert bool(result.train) is kept


class CountingTokenizer:
    """A real tokenizer that counts how often it tokenizes."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner, self.calls = tokenizer, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_length_check_refuses_by_bytes_before_tokenizing() -> None:
    from transformers import AutoTokenizer

    from appliance import chat
    from tests.conftest import TOKENIZER_DIR

    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))
    check = datasets.LengthCheck(tokenizer, 100)
    # SmolLM2's longest token is 81 bytes (81 spaces after a newline); its NFC normalizer triples it
    assert check.token_bytes == 3 * 82 and check.max_text_bytes == 100 * 246
    assert check.max_line_bytes == 6 * 100 * 246 + 2**20
    short = conv(("user", "Hi there"), ("assistant", "Hello"))
    assert check(short) == chat.count_tokens(tokenizer.inner, short) and tokenizer.calls == 1
    with pytest.raises(Rejected) as exc:
        check(conv(("user", "x" * 30_000), ("assistant", "y")))
    assert exc.value.code == "too_long" and tokenizer.calls == 1
    assert exc.value.reason == ("longer than the context: 30,001 bytes of message text are at least "
                                "122 tokens > 100")
    with pytest.raises(Rejected) as exc:  # the message text fits, the rendered text does not
        check(conv(("user", "x" * 24_590), ("assistant", "y")))
    assert exc.value.code == "too_long" and tokenizer.calls == 1
    assert exc.value.reason.endswith(" bytes of text are at least 101 tokens > 100")
    with pytest.raises(Rejected) as exc:
        check(conv(("user", "the cat " * 200), ("assistant", "y")))  # few bytes, too many tokens
    assert exc.value.code == "too_long" and "tokens > 100" in exc.value.reason and tokenizer.calls == 2
