"""The judge: a local GGUF model reads the base's answer and a target's answer to each held-out
item and says which is better, fully offline, through the runtime's llama.cpp engine.

How a verdict is read, and why:
- The judge is asked twice per item, once with the base as answer A and the target as B, once
  swapped, so a judge that prefers whatever comes first (small models do) cancels out. The two
  verdicts, mapped back to base/target, agree (the item is a win, a loss or a tie for the target)
  or not (inconsistent); the agreement rate between the orders is reported beside the counts.
- The prompt is the rubric (`rubric.py`) rendered with the judge's own chat template and tokenized
  as `chat` and `serve` do (the engine's `prompt_ids`). The verdict is not parsed from generated
  text: the judge's next-token probabilities after the prompt are read (`GgufLM.logits`, the
  export stage's scoring wrapper over the same file), each label's probability is the sum over
  its spellings that are one token ("A", " A"; "tie", " tie", "Tie", " Tie"), and the most
  probable label is the verdict. A small judge cannot ramble or answer off-format; how much
  probability the three labels hold (`mass`) is kept per question, so a judge that did not
  understand the format shows.
- A question whose prompt does not fit the judge's trained context is not asked (the item is
  "skipped" and counted apart).

Each target's verdicts are kept item by item in the job's folder (`results.ItemLog`), with the
sha256 of the judge's file and of the rubric: a resumed job asks only what it lacks, and a line
asked of another judge or rubric does not count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.errors import ApplianceError, NotFoundError, RefusedError, ValidationError
from appliance.fsutil import sha256_file
from appliance.progress import Reporter
from appliance.stages.eval import results
from appliance.stages.eval import rubric as rubrics
from appliance.workspace import Workspace

LABELS = ("A", "B", "tie")
SPELLINGS = {"A": ("A", " A"), "B": ("B", " B"), "tie": ("tie", " tie", "Tie", " Tie")}
ORDERS = (("base", "target"), ("target", "base"))  # (who is answer A, who is answer B), per order
OUTCOMES = ("win", "loss", "tie", "inconsistent", "skipped")  # for the target
Messages = list[dict[str, str]]
_GUIDE = "a judge is a GGUF: an export (appliance exports list), a model imported from a .gguf, " \
         "or a .gguf file"


@dataclass(frozen=True)
class JudgeSetup:
    """What the job judges with, settled before any model is loaded."""

    name: str
    path: Path  # the .gguf file
    sha256: str
    parity: str
    rubric: rubrics.Rubric

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.path.name, "sha256": self.sha256,
                "parity": self.parity, "rubric": self.rubric.origin,
                "rubric_sha256": self.rubric.sha256,
                "orders": ["A = base, B = target", "A = target, B = base"],
                "verdict": "the most probable of the labels A, B, tie as the judge's next token "
                           "after the rubric (each label summed over its spellings)"}


def resolve(ws: Workspace, name: str) -> tuple[str, Path, str]:
    """A judge name or path -> (name, its .gguf file, parity); anything that is not a GGUF is
    refused in one line naming what it is."""
    from appliance.runtime import engines

    try:
        artifact = engines.resolve(name, ws, allow_failed_parity=True)
    except RefusedError as exc:
        raise RefusedError(f"the judge must be a GGUF: {exc.message}", hint=_GUIDE) from None
    except NotFoundError:
        for kind in ("run", "dataset", "eval"):
            try:
                ws.get(kind, name)
            except (NotFoundError, ValidationError):
                continue
            raise RefusedError(f"the judge must be a GGUF: {name!r} is a {kind}",
                               hint=_GUIDE + (f"; export the run first: appliance export gguf {name}"
                                              if kind == "run" else "")) from None
        raise
    if artifact.kind != "gguf":
        raise RefusedError(f"the judge must be a GGUF: {name!r} is an {artifact.kind.upper()} "
                           "model (the judge runs in llama.cpp)", hint=_GUIDE)
    return artifact.name, artifact.path, artifact.parity


def setup(ws: Workspace, judge: str, rubric: str, report: Reporter) -> JudgeSetup:
    """Resolve the judge and load the rubric (errors before any target is loaded)."""
    name, path, parity = resolve(ws, judge)
    loaded = rubrics.load(rubric)
    report.log(f"judge: {name} ({path.name}); rubric: {loaded.origin}")
    return JudgeSetup(name, path, sha256_file(path), parity, loaded)


# -- questions and verdicts ----------------------------------------------------------------------
def question_text(messages: Messages) -> str:
    """What the answers answer: the user's message, or the whole conversation as `role: text`
    lines when there is more than one message (a system prompt, earlier turns)."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def questions(rubric_text: str, item: dict[str, Any], base: str, target: str) -> list[Messages]:
    """The two prompts for an item, one per order (ORDERS)."""
    answers = {"base": base, "target": target}
    return [[{"role": "user", "content": rubrics.fill(
        rubric_text, question=question_text(item["messages"]), reference=item["reference"],
        answer_a=answers[a], answer_b=answers[b])}] for a, b in ORDERS]


def winner(order: int, label: str | None) -> str | None:
    """A label of order 0 or 1 -> "base", "target" or "tie" (None: not asked)."""
    if label is None or label == "tie":
        return label
    return ORDERS[order][LABELS.index(label)]


def outcome(first: str | None, second: str | None) -> str:
    """The two orders' winners -> the item's outcome for the target (OUTCOMES)."""
    if first is None or second is None:
        return "skipped"
    if first != second:
        return "inconsistent"
    return {"target": "win", "base": "loss", "tie": "tie"}[first]


def item_verdict(entry: dict[str, Any]) -> dict[str, Any]:
    """A judge log line -> the item's `judge` block in eval.json."""
    orders = [{**asked, "winner": winner(n, asked.get("label"))} for n, asked in enumerate(entry["orders"])]
    result = outcome(orders[0]["winner"], orders[1]["winner"])
    return {"order1": orders[0], "order2": orders[1],
            "consistent": None if result == "skipped" else result != "inconsistent",
            "verdict": result}


def summary(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A target's judge block: wins, losses, ties, inconsistent and skipped items, and how often
    the two orders agreed among the items asked in both."""
    counts = {o: sum(v["verdict"] == o for v in verdicts) for o in OUTCOMES}
    judged = len(verdicts) - counts["skipped"]
    agreed = judged - counts["inconsistent"]
    return {"wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
            "inconsistent": counts["inconsistent"], "skipped": counts["skipped"], "judged": judged,
            "agreed": agreed, "agreement": agreed / judged if judged else None}


# -- asking ----------------------------------------------------------------------------------------
class Judge(Protocol):
    def size(self, prompts: Sequence[Messages]) -> None:
        """Prepare for these prompts (the context they need)."""

    def ask(self, messages: Messages) -> dict[str, Any]:
        """{"label": one of LABELS, "p": {label: probability}, "mass", "tokens"}, or
        {"label": None, "reason": "overflow", "tokens"} when the prompt does not fit."""

    def close(self) -> None: ...


class LlamaJudge:
    """The judge in llama.cpp: the runtime's engine renders and tokenizes its prompts (the GGUF's
    own chat template, as chat does), and the same file in `GgufLM` gives the next-token logits.
    The scorer is opened once the prompts are known, with the context the longest needs."""

    def __init__(self, path: Path) -> None:
        from appliance.runtime.engine import Artifact
        from appliance.runtime.engines import open_engine
        from appliance.runtime.llama_engine import gguf_context_length

        self.path = path
        self.trained = gguf_context_length(path) or 2048
        # the engine only renders and tokenizes here: the smallest context it allows
        self.engine = open_engine(Artifact(path.stem, "gguf", path, "unknown"), context_length=16)
        self.scorer: Any = None
        self.tokens: dict[str, list[int]] = {}

    def size(self, prompts: Sequence[Messages]) -> None:
        from appliance.runtime.engine import job_threads
        from export.gguf import GgufLM

        longest = max((len(self.engine.prompt_ids(p)) for p in prompts), default=1)
        n_ctx = min(-(-longest // 256) * 256, self.trained)
        if self.scorer is not None:
            self.scorer.close()
        self.scorer = GgufLM(self.path, n_ctx=n_ctx, n_threads=job_threads())
        self.tokens = label_tokens(self.scorer.tokenize, self.scorer.add_bos, self.scorer.bos_id)

    def ask(self, messages: Messages) -> dict[str, Any]:
        ids = self.engine.prompt_ids(messages)
        if len(ids) > self.scorer.n_ctx:
            return {"label": None, "reason": "overflow", "tokens": len(ids)}
        last = self.scorer.logits_at(ids, [len(ids) - 1])[0]
        return {**read_verdict(last, self.tokens), "tokens": len(ids)}

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        self.engine.close()


def label_tokens(tokenize: Callable[..., list[int]], add_bos: bool, bos_id: int) -> dict[str, list[int]]:
    """Each label -> the tokens that start it: its spellings that are one token each (a first token
    of a longer spelling, like "t" of "t|ie", would count every word that starts with it), or the
    first tokens of its spellings when none is; a token two labels share is left out."""
    whole: dict[str, set[int]] = {}
    first: dict[str, set[int]] = {}
    for label, spellings in SPELLINGS.items():
        for text in spellings:
            ids = tokenize(text, special=False)
            ids = ids[1:] if add_bos and ids and ids[0] == bos_id else ids
            if ids:
                first.setdefault(label, set()).add(ids[0])
                if len(ids) == 1:
                    whole.setdefault(label, set()).add(ids[0])
    chosen = {label: whole.get(label) or first.get(label, set()) for label in LABELS}
    out = {label: sorted(t for t in ids if not any(t in chosen[o] for o in LABELS if o != label))
           for label, ids in chosen.items()}
    if not all(out.values()):
        raise ApplianceError("the judge's vocabulary cannot tell the labels A, B and tie apart by "
                             "their first token", title="Unusable judge",
                             hint="pick another judge model")
    return out


def read_verdict(logits: Any, tokens: dict[str, list[int]]) -> dict[str, Any]:
    """Next-token logits -> each label's probability (softmax over the whole vocabulary, summed
    over the label's tokens), the most probable label, and the labels' total probability."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    top = float(row.max())
    log_total = top + math.log(float(np.exp(row - top).sum()))
    p = {label: float(np.exp(row[ids] - log_total).sum()) for label, ids in tokens.items()}
    return {"label": max(LABELS, key=lambda k: p[k]), "p": {k: round(v, 6) for k, v in p.items()},
            "mass": round(sum(p.values()), 6)}


def judge_all(setup_: JudgeSetup, open_judge: Callable[[], Judge], items: Sequence[dict[str, Any]],
              base: results.ItemLog, targets: Sequence[tuple[str, results.ItemLog, results.ItemLog]],
              attempt: int, report: Reporter) -> None:
    """Ask the judge, both orders, about every item each target's judge log lacks; `targets`:
    (name, its answers, its judge log). Each item is appended as it is judged; the judge is loaded
    only if something is left to ask, once, with the context the longest prompt needs."""
    todo: list[tuple[str, results.ItemLog, str, list[Messages]]] = []
    for name, answers, log in targets:
        keys = [results.item_key(i) for i in items]
        left = [(k, i) for k, i in zip(keys, items, strict=True) if not is_done(log.done.get(k), setup_)]
        if len(left) < len(items):
            report.log(f"judge, {name}: {len(items) - len(left)} of {len(items)} items already "
                       f"judged (kept from before), {len(left)} to go")
        todo += [(name, log, k, questions(setup_.rubric.text, i, base.done[k]["answer"],
                                          answers.done[k]["answer"])) for k, i in left]
    if not todo:
        return
    report.log(f"loading the judge {setup_.name}")
    judge = open_judge()
    try:
        judge.size([p for *_, pair in todo for p in pair])
        for n, (name, log, key, pair) in enumerate(todo):
            report.check_cancel()
            log.add({"key": key, "judge_sha256": setup_.sha256, "rubric_sha256": setup_.rubric.sha256,
                     "orders": [judge.ask(p) for p in pair], "attempt": attempt})
            report.progress(n + 1, len(todo), stage="judge", unit="items", label=f"judging {name}")
    finally:
        judge.close()


def is_done(entry: dict[str, Any] | None, setup_: JudgeSetup) -> bool:
    return entry is not None and entry.get("judge_sha256") == setup_.sha256 \
        and entry.get("rubric_sha256") == setup_.rubric.sha256
