"""Next-token sampling in numpy for the ONNX engine, with llama.cpp's parameter meanings.

Why numpy and why this order: onnxruntime gives logits, not tokens, and the appliance promises the
same knobs mean the same thing on both runtimes. llama.cpp's chain (as the llama engine builds it)
is: logit bias -> repetition penalty -> top-k -> top-p -> temperature -> draw; greedy
(temperature 0) is the bias and the penalty, then argmax. The logit bias (OpenAI's `logit_bias`)
is added to the raw logits, as llama.cpp's logit-bias sampler adds it. The repetition penalty is
CTRL's (a positive logit is divided by it, a negative one multiplied), applied once to every
distinct token among the last `PENALTY_WINDOW` tokens, the prompt's included. top-p keeps the
smallest set of most likely tokens whose probability (before temperature, as in llama.cpp)
reaches p. The draw uses `np.random.default_rng(seed)`: a seed makes a whole generation
reproducible.

Cost per token matters (the server must stay within 5% of the engine): the full vocabulary is
only exponentiated once; top-k and top-p sort a small candidate set (argpartition), widening it
only when its mass falls short of p.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from appliance.runtime.engine import Sampling

PENALTY_WINDOW = 64
CANDIDATES = 256


def apply_repeat_penalty(logits: np.ndarray, recent: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL repetition penalty on a float32 copy of `logits` over the distinct `recent` tokens."""
    ids = np.fromiter(set(recent), dtype=np.int64)
    if penalty == 1.0 or ids.size == 0:
        return logits
    out = logits.copy()
    picked = out[ids]
    out[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def apply_logit_bias(logits: np.ndarray, ids: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """`biases` added to the logits of `ids`, on a copy (the caller's row is left alone)."""
    if ids.size == 0:
        return logits
    out = logits.copy()
    out[ids] += biases
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def top_candidates(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Token ids kept by top-k then top-p, most likely first (all ids when both are off)."""
    n = logits.size
    k = top_k if 0 < top_k < n else n
    if top_p >= 1.0:
        if k == n:
            return np.arange(n)
        return _sorted_top(logits, k)
    probs = softmax(_restricted(logits, k))
    width = min(k, CANDIDATES)
    while True:
        ids = _sorted_top(probs, width)
        cumulative = np.cumsum(probs[ids])
        if cumulative[-1] >= top_p or width >= k:
            keep = int(np.searchsorted(cumulative, top_p)) + 1  # the token that reaches p is kept
            return ids[:min(keep, ids.size)]
        width = min(k, width * 4)


def _restricted(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits with everything outside the top k at -inf (so top-p renormalizes over the k)."""
    if k >= logits.size:
        return logits
    out = np.full_like(logits, -np.inf)
    ids = np.argpartition(logits, -k)[-k:]
    out[ids] = logits[ids]
    return out


def _sorted_top(values: np.ndarray, k: int) -> np.ndarray:
    if k >= values.size:
        return np.argsort(-values, kind="stable")
    ids = np.argpartition(values, -k)[-k:]
    return ids[np.argsort(-values[ids], kind="stable")]


class Sampler:
    """Picks each next token; `history` seeds the penalty window (the prompt's last tokens)."""

    def __init__(self, sampling: Sampling, history: Iterable[int] = ()) -> None:
        self.temperature = float(sampling.temperature)
        self.top_k = int(sampling.top_k)
        self.top_p = float(sampling.top_p)
        self.penalty = float(sampling.repeat_penalty)
        self.recent: deque[int] = deque(history, maxlen=PENALTY_WINDOW)
        self.rng = np.random.default_rng(sampling.seed)
        self.bias_ids = np.array([t for t, _ in sampling.logit_bias], dtype=np.int64)
        self.biases = np.array([b for _, b in sampling.logit_bias], dtype=np.float32)

    def __call__(self, logits: np.ndarray) -> int:
        logits = apply_logit_bias(logits, self.bias_ids, self.biases)
        logits = apply_repeat_penalty(logits, self.recent, self.penalty)
        token = int(np.argmax(logits)) if self.temperature == 0.0 else self._draw(logits)
        self.recent.append(token)
        return token

    def _draw(self, logits: np.ndarray) -> int:
        ids = top_candidates(logits, self.top_k, self.top_p)
        probs = softmax(logits[ids].astype(np.float64) / self.temperature)
        cumulative = np.cumsum(probs)
        at = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(ids[min(at, ids.size - 1)])
