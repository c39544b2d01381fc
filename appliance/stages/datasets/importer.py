"""Dataset import: JSONL in four common forms -> canonical `messages`, with a full account.

Forms (detected from the first record, or named with --format):
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
- sharegpt: {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
- alpaca:   {"instruction", "input" (optional), "output"}   user = instruction [+ blank line + input]
- dolly:    {"instruction", "context" (optional), "response"} user = instruction [+ blank line + context]

Every line is accounted for: kept, removed as an exact duplicate of an earlier conversation, or
rejected with its line number and a reason (bad JSON, not UTF-8, text that is not valid Unicode,
missing field, unknown role, empty content, roles out of order, longer than the context, ...). No
single line can stop the import: whatever a line holds (a lone surrogate, 100,000 nested brackets, a
5,000-digit number, a NUL byte, 500 MB without a newline), it is rejected on its own. The kept
conversations are split into train/eval with a seeded shuffle, and measured in tokens with the
chosen model's chat template.

Huge lines cost little: `LengthCheck` knows the most bytes one token of the model's tokenizer can
stand for, so a line longer than any conversation that fits the context could be as JSON is skipped
while it is read (in bounded chunks, never held whole), and a rendered conversation whose text is
longer than the context could hold is refused before it is tokenized.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import chat, licences
from appliance.errors import InvalidRequest, NotFoundError, ValidationError
from appliance.fsutil import sha256_file, write_jsonl
from appliance.stages.datasets.request import FORMS, ImportDatasetRequest
from appliance.workspace import ArtifactRecord, Workspace, check_name, parent_ref, slugify

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant"}
Messages = list[dict[str, str]]


class Rejected(Exception):
    """One line that cannot be used; `code` groups reasons in the report."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class ImportResult:
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, int]] = field(default_factory=list)
    lines: int = 0
    form: str = ""


# -- reading ---------------------------------------------------------------------------------
_SKIP_CHUNK = 1 << 20


def read_lines(path: Path, max_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every line; rejected lines yield a `Rejected` instead.

    A line longer than `max_bytes` is not read into memory: it is skipped in 1 MiB chunks up to
    its newline and rejected as too long.
    """
    limit = -1 if max_bytes is None else max_bytes + 1
    with open(path, "rb") as fh:
        for number in itertools.count(1):
            raw = fh.readline(limit)
            if not raw:
                return
            if max_bytes is not None and len(raw.rstrip(b"\n")) > max_bytes:
                size = len(raw)
                while not raw.endswith(b"\n"):
                    raw = fh.readline(_SKIP_CHUNK)
                    if not raw:
                        break
                    size += len(raw)
                size -= raw.endswith(b"\n")
                yield number, Rejected("too_long", f"line of {size:,} bytes: longer than any "
                                       f"conversation that fits the context can be as JSON "
                                       f"(at most {max_bytes:,} bytes); not parsed")
                continue
            yield number, _parse_line(raw)


def _parse_line(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected("not_utf8", f"not UTF-8: byte 0x{raw[exc.start]:02x} at column "
                                    f"{exc.start + 1}")
    text = text.strip().lstrip("\ufeff")
    if not text:
        return Rejected("empty_line", "empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejected("bad_json", f"bad JSON: {exc.msg} (column {exc.colno})")
    except RecursionError:
        return Rejected("bad_json", "bad JSON: nested too deeply")
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        return Rejected("bad_json", f"bad JSON: {_short(str(exc), 120)}")
    if not isinstance(obj, dict):
        return Rejected("bad_json", f"bad JSON: expected an object, got {type(obj).__name__}")
    return obj


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(value: Any) -> str:
    """repr of a value from the file, cut short for a report line (escapes lone surrogates)."""
    return _short(repr(value))


def detect_form(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "instruction" in obj and "response" in obj:
        return "dolly"
    return None


# -- converting ------------------------------------------------------------------------------
def _field(obj: dict[str, Any], name: str, where: str = "") -> Any:
    if name not in obj or obj[name] is None:
        raise Rejected("missing_field", f"missing field {name!r}{where}")
    return obj[name]


def _text(value: Any, name: str, where: str = "") -> str:
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"field {name!r}{where} must be a string, "
                                     f"got {type(value).__name__}")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise Rejected("wrong_type", f"field {name!r} must be a list, got {type(value).__name__}")
    return value


def _turn_pair(obj: dict[str, Any], question: str, extra: str, answer: str) -> Messages:
    prompt = _text(_field(obj, question), question)
    more = obj.get(extra) or ""
    more = _text(more, extra)
    user = f"{prompt}\n\n{more}" if more.strip() else prompt
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": _text(_field(obj, answer), answer)}]


def _from_messages(obj: dict[str, Any]) -> Messages:
    out = []
    for i, msg in enumerate(_list(_field(obj, "messages"), "messages"), start=1):
        where = f" in message {i}"
        if not isinstance(msg, dict):
            raise Rejected("wrong_type", f"message {i} must be an object")
        out.append({"role": _text(_field(msg, "role", where), "role", where),
                    "content": _text(_field(msg, "content", where), "content", where)})
    return out


def _from_sharegpt(obj: dict[str, Any]) -> Messages:
    out = []
    for i, msg in enumerate(_list(_field(obj, "conversations"), "conversations"), start=1):
        where = f" in turn {i}"
        if not isinstance(msg, dict):
            raise Rejected("wrong_type", f"turn {i} must be an object")
        who = _text(_field(msg, "from", where), "from", where)
        if who not in SHAREGPT_ROLES:
            raise Rejected("unknown_role", f"unknown role {_shown(who)}{where} (known: "
                                           f"{', '.join(SHAREGPT_ROLES)})")
        out.append({"role": SHAREGPT_ROLES[who],
                    "content": _text(_field(msg, "value", where), "value", where)})
    return out


CONVERTERS: dict[str, Callable[[dict[str, Any]], Messages]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": lambda o: _turn_pair(o, "instruction", "input", "output"),
    "dolly": lambda o: _turn_pair(o, "instruction", "context", "response"),
}


def check_conversation(messages: Messages) -> None:
    """Roles known, content non-empty, order system? (user assistant)+."""
    if not messages:
        raise Rejected("missing_field", "the conversation has no messages")
    for i, msg in enumerate(messages, start=1):
        if msg["role"] not in chat.ROLES:
            raise Rejected("unknown_role", f"unknown role {_shown(msg['role'])} in message {i} "
                                           f"(known: {', '.join(chat.ROLES)})")
        if not msg["content"].strip():
            raise Rejected("empty_content", f"empty content in message {i} ({msg['role']})")
        _check_unicode(msg["content"], i, msg["role"])
    start = 1 if messages[0]["role"] == "system" else 0
    for i, msg in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise Rejected("role_order", f"roles out of order: message {i + 1} is "
                                         f"{msg['role']!r}, expected {expected!r} (a conversation "
                                         "is an optional system message, then user/assistant "
                                         "turns)")
    if messages[-1]["role"] != "assistant":
        raise Rejected("role_order", "roles out of order: the conversation must end with an "
                                     "assistant message")


def _check_unicode(text: str, i: int, role: str) -> None:
    """JSON can spell a lone surrogate ("\\ud800"): a str no tokenizer can encode and no UTF-8
    file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Rejected("bad_text", f"message {i} ({role}) is not valid Unicode text: a lone "
                                   f"surrogate \\u{ord(text[exc.start]):04x} at character "
                                   f"{exc.start + 1}") from None


def convert(obj: dict[str, Any], form: str) -> Messages:
    messages = CONVERTERS[form](obj)
    check_conversation(messages)
    return messages


# -- the import ------------------------------------------------------------------------------
class LengthCheck:
    """Counts tokens with the model's template and rejects conversations over the limit.

    The cheap bounds rest on one fact about the tokenizer: no token stands for more than
    `token_bytes` bytes of text (the longest token in its vocabulary, decoded; tripled when the
    tokenizer normalizes text first, since Unicode normalization can shrink text about 3x, e.g.
    Hangul jamo composing into syllables). So a text of B bytes is at least B / token_bytes tokens:
    - a rendered conversation longer than max_tokens * token_bytes bytes is refused untokenized;
    - a file line is refused unread when it is longer than that text could be as JSON
      (`max_line_bytes`: an escape such as \\u0001 spells one byte with six) plus 1 MiB for keys
      and roles. This assumes the template renders each message's text, as chat templates do.
    """

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.token_bytes = longest_token_bytes(tokenizer)
        self.max_text_bytes = max_tokens * self.token_bytes
        self.max_line_bytes = 6 * self.max_text_bytes + (1 << 20)

    def __call__(self, messages: Messages) -> int:
        self._check_bytes(sum(len(m["content"].encode("utf-8")) for m in messages), "message text")
        try:
            text = chat.render(self.tokenizer, messages)
        except chat.TemplateError as exc:
            if exc.bound == "output_chars":
                raise Rejected("too_long", f"longer than the context: {exc.message}") from None
            raise Rejected("template_error", f"the model's chat template rejects this "
                                             f"conversation: {exc.message}") from None
        self._check_bytes(len(text.encode("utf-8")), "text")
        try:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        except (TypeError, ValueError) as exc:  # text the tokenizer cannot take
            raise Rejected("tokenizer_error", f"the model's tokenizer rejects this conversation: "
                                              f"{_short(str(exc), 200)}") from None
        if n > self.max_tokens:
            raise Rejected("too_long", f"longer than the context: {n} tokens > {self.max_tokens}")
        return n


    def _check_bytes(self, size: int, what: str) -> None:
        if size > self.max_text_bytes:
            raise Rejected("too_long", f"longer than the context: {size:,} bytes of {what} are at "
                                       f"least {math.ceil(size / self.token_bytes):,} tokens > "
                                       f"{self.max_tokens}")


def longest_token_bytes(tokenizer: Any) -> int:
    """The most bytes of text one token of `tokenizer` can stand for (see LengthCheck)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: its vocabulary strings, in UTF-8, bound their text
        return 3 * max((len(t.encode("utf-8", "replace")) for t in tokenizer.get_vocab()), default=1)
    ids = [[i] for i in range(backend.get_vocab_size(with_added_tokens=True))]
    pieces = backend.decode_batch(ids, skip_special_tokens=False)
    longest = max((len(p.encode("utf-8", "replace")) for p in pieces), default=1) + 1
    return longest * (3 if backend.normalizer is not None else 1)


def parse_file(path: Path, form: str, measure: Callable[[Messages], int],
               progress: Callable[[int], None] | None = None, *,
               max_line_bytes: int | None = None) -> ImportResult:
    result = ImportResult(form=form)
    seen: dict[str, int] = {}
    for number, obj in read_lines(path, max_line_bytes):
        result.lines = number
        if progress and number % 200 == 0:
            progress(number)
        try:
            if isinstance(obj, Rejected):
                raise obj
            if not result.form or result.form == "auto":
                result.form = _detect_or_reject(obj)
            messages = convert(obj, result.form)
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            if key in seen:
                result.duplicates.append({"line": number, "duplicate_of": seen[key]})
                continue
            tokens = measure(messages)
        except Rejected as rej:
            result.rejected.append({"line": number, "code": rej.code, "reason": rej.reason})
            continue
        seen[key] = number
        result.train.append({"messages": messages, "line": number, "tokens": tokens})
    return result


def _detect_or_reject(obj: dict[str, Any]) -> str:
    form = detect_form(obj)
    if form is None:
        keys = ", ".join(_shown(k) for k in sorted(obj)[:6])
        raise Rejected("missing_field", f"cannot tell the format from the keys [{keys}]; expected "
                                        f"one of {', '.join(FORMS)} (name it with --format)")
    return form


def split(rows: list[dict[str, Any]], eval_fraction: float, seed: int
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded split; each side keeps file order. At least one eval row when there are two+."""
    n = len(rows)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(n_eval, 1)
    n_eval = min(n_eval, max(n - 1, 0))  # never leave train empty
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in eval_idx],
            [r for i, r in enumerate(rows) if i in eval_idx])


def length_stats(tokens: list[int], bins: int = 10) -> dict[str, Any]:
    if not tokens:
        return {"count": 0}
    ordered = sorted(tokens)
    top = ordered[-1]
    width = max(1, -(-top // bins))
    histogram = Counter(min(t // width, bins - 1) for t in ordered)
    return {
        "count": len(ordered), "total": sum(ordered), "min": ordered[0], "max": top,
        "mean": round(statistics.fmean(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "histogram": [{"from": b * width, "to": (b + 1) * width, "count": histogram.get(b, 0)}
                      for b in range(bins)],
    }


def build_report(result: ImportResult, eval_rows: list[dict[str, Any]],
                 train_rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = train_rows + eval_rows
    return {
        "form": result.form,
        "lines": result.lines,
        "kept": len(kept),
        "train": len(train_rows),
        "eval": len(eval_rows),
        "rejected": len(result.rejected),
        "duplicates": len(result.duplicates),
        "rejected_by_reason": dict(Counter(r["code"] for r in result.rejected)),
        "rejections": result.rejected,
        "duplicate_lines": result.duplicates,
        "tokens": length_stats([r["tokens"] for r in kept]),
    }


def import_file(ws: Workspace, src: Path, model: ArtifactRecord, *, name: str | None = None,
                form: str = "auto", eval_fraction: float = 0.1, seed: int = 0,
                max_tokens: int | None = None, license: str | None = None,
                attribution: str | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[ArtifactRecord, dict]:
    from appliance.hfmodel import load_tokenizer

    src = src.expanduser().resolve()
    if not src.exists():
        raise NotFoundError(f"{src} does not exist", hint="give the path of a JSONL file")
    if not src.is_file():
        raise ValidationError(f"{src} is not a file")
    if form != "auto" and form not in FORMS:
        raise ValidationError(f"unknown format {form!r}; known: auto, {', '.join(FORMS)}")
    if not 0 <= eval_fraction < 1:
        raise ValidationError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    context = model.summary.get("context_length") or 2048
    limit = min(max_tokens or context, context)
    name = check_name(name or slugify(src.stem))
    measure = LengthCheck(load_tokenizer(model.path), limit)
    result = parse_file(src, form, measure, progress, max_line_bytes=measure.max_line_bytes)
    train_rows, eval_rows = split(result.train, eval_fraction, seed)
    report = build_report(result, eval_rows, train_rows)
    if not train_rows:
        shown = "; ".join(f"line {r['line']}: {r['reason']}" for r in result.rejected[:5])
        raise ValidationError(f"{src}: no usable conversations ({result.lines} lines). {shown}",
                              hint="fix the file; every rejected line is listed with its reason")
    with ws.writer("dataset", name) as w:
        write_jsonl(w.path / "train.jsonl", train_rows)
        write_jsonl(w.path / "eval.jsonl", eval_rows)
        (w.path / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        texts = licences.copy_texts(licences.files_beside(src), w.path)
        licence = licences.record({}, texts, w.path, license, attribution)
        w.commit(
            parents=[parent_ref(model)],
            config={"source": {"path": str(src), "sha256": sha256_file(src)}, "form": report["form"],
                    "eval_fraction": eval_fraction, "seed": seed, "max_tokens": limit},
            info={"license": licence,
                  "summary": {k: report[k] for k in ("form", "train", "eval", "rejected",
                                                     "duplicates")} | {"model": model.name}})
    return ws.get("dataset", name), report


def load_rows(record: ArtifactRecord, part: str = "train") -> list[dict[str, Any]]:
    path = record.path / f"{part}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run(ws: Workspace, request: ImportDatasetRequest,
        progress: Callable[[int], None] | None = None) -> tuple[ArtifactRecord, dict]:
    """The data import stage's one entry (the CLI and the TUI): the model looked up (an unknown
    one names the available ones), the request's problems refused naming each field, then
    `import_file`."""
    model = ws.get("model", request.model)
    found = request.problems()
    if "path" in found and request.path and not Path(request.path).exists():
        raise NotFoundError(found["path"], hint="give the path of a JSONL file")
    if found:
        raise InvalidRequest("the dataset import is not valid", found)
    return import_file(ws, Path(request.path), model, name=request.name, form=request.form,
                       eval_fraction=request.eval_fraction, seed=request.seed,
                       max_tokens=request.max_tokens, license=request.license,
                       attribution=request.attribution, progress=progress)
