"""The parity gate: does an exported artifact say what the trained model says?

The held-out split of the run's dataset is rendered with the model's chat template and scored on
its assistant tokens (the ones training learned) by the merged model (the reference, fp32 through
transformers) and by each artifact through its own runtime (llama.cpp for GGUF, onnxruntime for
ONNX; the adapter model, NF4 base + LoRA as trained, through peft). Per artifact: perplexity and
its change against the reference, mean KL(reference || artifact) and greedy next-token agreement.
One rendered conversation is also tokenized by each runtime's own tokenizer: the ids must be
identical, or the artifact would be served a different prompt from the one it was trained on.

Thresholds are per type (`THRESHOLDS`); an artifact that misses one fails the gate, is marked failed
in the registry and is refused by the runtime unless explicitly overridden.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from appliance import chat


class Scorer(Protocol):
    def logits(self, ids: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Threshold:
    ppl_increase: float   # relative perplexity increase over the reference, at most
    kl: float             # mean KL(reference || artifact) in nats, at most
    agreement: float      # greedy next-token agreement with the reference, at least


# Set from measurements on SmolLM2-135M + the demo's adapter (16 held-out conversations; numbers in
# bench/results/parity-smollm2.md). A 135M model is the worst case for quantization (its hidden size
# 576 also makes llama.cpp fall back to 5/8-bit blocks for many K-quant tensors), so the quantized
# types get room for what a healthy small-model export loses and still catch broken ones: a
# symmetric all-4-bit ONNX measured +112% perplexity / KL 0.75 and fails every line. Lossless types
# get rounding noise only. Agreement is noisy on a few hundred tokens (near-ties flip).
THRESHOLDS: dict[str, Threshold] = {
    "f32": Threshold(0.001, 0.001, 0.995), "fp32": Threshold(0.001, 0.001, 0.995),
    "f16": Threshold(0.005, 0.005, 0.97), "fp16": Threshold(0.005, 0.005, 0.97),
    "bf16": Threshold(0.01, 0.01, 0.95),
    "q8_0": Threshold(0.02, 0.02, 0.90), "int8": Threshold(0.02, 0.03, 0.90),
    "q6_k": Threshold(0.03, 0.04, 0.88), "q5_k_m": Threshold(0.04, 0.07, 0.85),
    "q4_k_m": Threshold(0.06, 0.12, 0.80), "int4": Threshold(0.18, 0.18, 0.75),
    "int4-cuda": Threshold(0.18, 0.18, 0.75),  # int4 weights on fp16 activations
    "adapter": Threshold(0.02, 0.05, 0.90),
}
FALLBACK = Threshold(0.10, 0.25, 0.75)  # other llama.cpp types (IQ*, Q3_K, ...): loose


def threshold_for(kind: str, overrides: dict[str, float] | None = None) -> Threshold:
    base = THRESHOLDS.get(kind.lower(), FALLBACK)
    if not overrides:
        return base
    return Threshold(**{**asdict(base), **overrides})


@dataclass
class Sample:
    input_ids: list[int]
    positions: list[int]   # positions whose next token is a trained (assistant) token
    targets: list[int]


def samples(tokenizer: Any, conversations: list[list[dict[str, str]]], stops: list[str],
            max_tokens: int = 384, limit: int | None = None) -> list[Sample]:
    """Up to `limit` conversations that have trained tokens within `max_tokens`, in order."""
    out: list[Sample] = []
    for messages in conversations:
        if limit is not None and len(out) >= limit:
            break
        r = chat.render_and_mask(tokenizer, messages, stops)
        ids, labels = r.input_ids[:max_tokens], r.labels[:max_tokens]
        pos = [i for i in range(len(ids) - 1) if labels[i + 1] != chat.IGNORE_INDEX]
        if pos:
            out.append(Sample(ids, pos, [ids[i + 1] for i in pos]))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _nll(log_probs: np.ndarray, targets: list[int]) -> float:
    return float(-log_probs[np.arange(len(targets)), targets].sum())


def logits_at(scorer: Scorer, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
    """The scorer's logits after each of `positions`; a scorer that can compute only those rows
    (`GgufLM.logits_at`: llama.cpp skips the output layer elsewhere) is asked for just them."""
    at = getattr(scorer, "logits_at", None)
    return at(ids, positions) if at is not None else scorer.logits(ids)[list(positions)]


def target_nll(logits: np.ndarray, targets: list[int]) -> float:
    """The summed negative log-likelihood of `targets`, one per row of `logits`: log-sum-exp minus
    the target's logit, the exponentials in float32 and their sums in float64 (a float64 copy of
    every row took a third of an eval's scoring time; the sum differs from it by ~1e-7)."""
    x = np.asarray(logits, dtype=np.float32)
    top = x.max(axis=-1)
    lse = np.log(np.exp(x - top[:, None]).sum(axis=-1, dtype=np.float64)) + top
    return float((lse - x[np.arange(len(targets)), targets]).sum())


@dataclass
class Score:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray, targets: list[int]) -> None:
        lp_ref, lp = _log_softmax(ref), _log_softmax(got)
        self.nll += _nll(lp, targets)
        self.kl += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        self.agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        self.count += len(targets)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.nll / max(self.count, 1), 50))


@dataclass
class ArtifactResult:
    name: str
    kind: str
    perplexity: float
    ppl_increase: float
    kl: float
    agreement: float
    tokens_identical: bool | None
    threshold: dict[str, float]
    passed: bool | None  # None: reported, not judged
    reasons: list[str] = field(default_factory=list)


def reference_rows(reference: Scorer, data: list[Sample], say: Callable[[str], None] = lambda _: None
                   ) -> list[np.ndarray]:
    """The reference's logits at the scored positions, computed once for every artifact."""
    rows = []
    for i, s in enumerate(data, 1):
        rows.append(logits_at(reference, s.input_ids, s.positions).astype(np.float32))
        say(f"reference: conversation {i}/{len(data)}")
    return rows


def score(scorer: Scorer, data: list[Sample], ref_rows: list[np.ndarray]) -> Score:
    result = Score()
    for s, ref in zip(data, ref_rows, strict=True):
        result.add(ref, logits_at(scorer, s.input_ids, s.positions), s.targets)
    return result


def judge(name: str, kind: str, score: Score, ref: Score, tokens_identical: bool | None,
          overrides: dict[str, float] | None = None) -> ArtifactResult:
    t = threshold_for(kind, overrides)
    increase = score.perplexity / ref.perplexity - 1
    kl, agreement = score.kl / max(score.count, 1), score.agree / max(score.count, 1)
    reasons = []
    if increase > t.ppl_increase:
        reasons.append(f"perplexity +{increase:.2%} > +{t.ppl_increase:.2%}")
    if kl > t.kl:
        reasons.append(f"KL {kl:.4f} > {t.kl}")
    if agreement < t.agreement:
        reasons.append(f"agreement {agreement:.2%} < {t.agreement:.0%}")
    if tokens_identical is False:
        reasons.append("prompt token ids differ from the reference tokenizer's")
    return ArtifactResult(name, kind, round(score.perplexity, 4), round(increase, 5), round(kl, 5),
                          round(agreement, 4), tokens_identical, asdict(t), not reasons, reasons)


def table(report: dict[str, Any]) -> str:
    """The report as a text table (what the CLI and the demo print); a tok/s column where the gate
    timed the decode (gates from before it did not)."""
    timed = any(r.get("decode_tokens_per_s") is not None for r in report["artifacts"])
    lines = [f"parity on {report['conversations']} held-out conversations, {report['tokens']} assistant "
             f"tokens; reference {report['reference']['name']}: perplexity "
             f"{report['reference']['perplexity']:.3f}",
             f"{'artifact':34} {'type':8} {'ppl':>8} {'Δppl':>8} {'KL':>8} {'agree':>7} {'ids':>4}"
             + (f" {'tok/s':>7}" if timed else "") + "  verdict"]
    for r in report["artifacts"]:
        ids = {True: "same", False: "DIFF", None: "-"}[r["tokens_identical"]]
        verdict = {True: "pass", None: "(reported, not gated)"}.get(r["passed"], "FAIL: " + "; ".join(
            r["reasons"]))
        speed = r.get("decode_tokens_per_s")
        lines.append(f"{r['name'][:34]:34} {r['kind']:8} {r['perplexity']:8.3f} {r['ppl_increase']:+8.2%} "
                     f"{r['kl']:8.4f} {r['agreement']:7.2%} {ids:>4}"
                     + (f" {'-' if speed is None else format(speed, '.1f'):>7}" if timed else "")
                     + f"  {verdict}")
    return "\n".join(lines)
