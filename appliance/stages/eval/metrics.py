"""The text metrics of an evaluation, and how text in any script is split into tokens for them.

BLEU and chrF come from sacrebleu (the reference implementation; its tokenizers include one for
Chinese). ROUGE is computed here, on our tokens, and checked against Google's rouge-score in the
tests: rouge-score's tokenizer keeps only [a-z0-9] and so scores any Chinese, Japanese, Thai,
Cyrillic or accented answer as 0 (measured: identical Chinese sentences get ROUGE-1 0.0), and it is
an sdist-only package that pulls nltk. `rouge_tokens` is rouge-score's tokenizer for ASCII text
(lowercase, runs of letters and digits, no stemming: the same tokens, so the same scores) extended
to every script: letters and digits of any alphabet form words, and each character of a script
written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar) is a token of its own.

BLEU needs the same choice: sacrebleu's `13a` for space-separated text, `zh` (each Han character a
token) when the references hold Han characters, `char` when they hold kana or another script
without spaces. chrF needs none: it counts character n-grams with whitespace removed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

# Scripts written without spaces between words: one token per character.
UNSEGMENTED = ("\u3040-\u30ff\u31f0-\u31ff"  # hiragana, katakana
               "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Han
               "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff")  # Thai, Lao, Myanmar, Khmer
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
OTHER_UNSEGMENTED = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")
_TOKEN = re.compile(f"[{UNSEGMENTED}]|[^\\W_{UNSEGMENTED}]+")
_SPACE = re.compile(r"\s+")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact", "contains")


def rouge_tokens(text: str) -> list[str]:
    """Lowercased words (letters and digits of any alphabet) and single characters of unsegmented
    scripts; on ASCII text exactly rouge-score's tokens without a stemmer."""
    return _TOKEN.findall(text.lower())


class RougeTokenizer:
    """`rouge_tokens` in the shape rouge-score's `RougeScorer(tokenizer=...)` takes (the tests)."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, predicted: int, expected: int) -> float:
    """rouge-score's F-measure: 2PR/(P+R), 0 when nothing overlaps."""
    precision, recall = overlap / max(predicted, 1), overlap / max(expected, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b, 1):
            row.append(previous[j - 1] + 1 if x == y else max(previous[j], row[j - 1]))
        previous = row
    return previous[-1]


def rouge(answer: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of `answer` against `reference`."""
    got, want = rouge_tokens(answer), rouge_tokens(reference)
    out = {}
    for n in (1, 2):
        a, b = _ngrams(got, n), _ngrams(want, n)
        out[f"rouge{n}"] = _f1(sum((a & b).values()), sum(a.values()), sum(b.values()))
    out["rougeL"] = _f1(_lcs(got, want), len(got), len(want)) if got and want else 0.0
    return out


def bleu_tokenizer(references: Sequence[str]) -> str:
    """sacrebleu's tokenizer for these references: `char` if any holds kana or Thai-like script,
    else `zh` if any holds Han characters, else `13a` (see the module docstring)."""
    if any(OTHER_UNSEGMENTED.search(r) for r in references):
        return "char"
    return "zh" if any(HAN.search(r) for r in references) else "13a"


def normalized(text: str) -> str:
    """Case-folded, whitespace collapsed: what exact and contains match compare."""
    return _SPACE.sub(" ", text).strip().casefold()


def item_scores(answer: str, reference: str, tokenize: str) -> dict[str, float]:
    """Every metric of one answer: ROUGE F-measures (0-1), sentence BLEU and chrF (0-100),
    exact and contains match (0 or 1)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu = BLEU(tokenize=tokenize, effective_order=True).sentence_score(answer, [reference]).score
    chrf = CHRF().sentence_score(answer, [reference]).score
    got, want = normalized(answer), normalized(reference)
    return {**rouge(answer, reference), "bleu": bleu, "chrf": chrf,
            "exact": float(got == want), "contains": float(bool(want) and want in got)}


def corpus_scores(answers: Sequence[str], references: Sequence[str], tokenize: str,
                  per_item: Sequence[dict[str, float]]) -> dict[str, Any]:
    """A target's totals: corpus BLEU and chrF (sacrebleu's, not a mean of sentence scores), the
    mean of every other metric over the items."""
    from sacrebleu.metrics import BLEU, CHRF

    n = max(len(per_item), 1)
    out: dict[str, Any] = {k: sum(s[k] for s in per_item) / n
                           for k in ("rouge1", "rouge2", "rougeL", "exact", "contains")}
    out["bleu"] = BLEU(tokenize=tokenize).corpus_score(list(answers), [list(references)]).score
    out["chrf"] = CHRF().corpus_score(list(answers), [list(references)]).score
    return out
