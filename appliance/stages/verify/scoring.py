"""Scoring models against a reference on held-out conversations: the measuring half of the gate.

The reference is a run's merged model (`HFScorer`, through transformers); what is scored against it
is an exported artifact through its own runtime (the gate, `gate`) or the adapter model as trained
(`AdapterScorer`, the merge's informational check). `Scoring` is one job's scoring: it reports each
scoring as a counted `score` stage, checks for a cancel before every conversation, and keeps the
reference's logits for the job's next artifacts (the merged model is scored once per job, not once
per artifact or once more by the merge that made it in the same job: both share a `ReferenceMemo`;
what it keeps lives and dies with the job, nothing module-global).
`parity` holds the measures and thresholds themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from appliance import chat, manifest
from appliance.errors import ApplianceError
from appliance.progress import QUIET, Reporter, Stages
from appliance.stages.verify import parity
from appliance.workspace import ArtifactRecord

if TYPE_CHECKING:
    import numpy as np

PARITY_CONVERSATIONS = 16
PARITY_MAX_TOKENS = 512


def parity_data(model: ArtifactRecord, dataset: ArtifactRecord, tokenizer: Any
                ) -> tuple[list[parity.Sample], str]:
    """The held-out conversations to score (a fixed sample), and one rendered conversation for the
    tokenizer check."""
    from appliance.stages.datasets import importer as datasets

    info = manifest.read(model.path)["info"]
    rows = datasets.load_rows(dataset, "eval")
    if not rows:
        raise ApplianceError(f"dataset {dataset.name!r} has no held-out (eval) conversations to score",
                             title="Nothing to score",
                             hint="import the dataset again with an eval split (--eval-fraction)")
    conversations = [r["messages"] for r in rows]
    data = parity.samples(tokenizer, conversations, info["stop_tokens"], PARITY_MAX_TOKENS,
                          limit=PARITY_CONVERSATIONS)
    if not data:
        raise ApplianceError(f"none of the {len(rows)} held-out conversations of {dataset.name!r} has an "
                             f"assistant turn within its first {PARITY_MAX_TOKENS} tokens",
                             title="Nothing to score", hint="use a dataset with shorter prompts")
    text = chat.render(tokenizer, conversations[0])  # bounded, the same text as transformers'
    return data, text


class HFScorer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        from appliance.stages.merge.weights import scoring_dtype

        self.dtype = scoring_dtype(folder)
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.dtype,
                                                          trust_remote_code=False).eval()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


class AdapterScorer(HFScorer):
    """The model as trained: NF4 base (bitsandbytes) + the LoRA adapter through peft."""

    def __init__(self, base: Path, adapter: Path, train_config: dict[str, Any]) -> None:
        import torch
        from peft import PeftModel

        from appliance.stages.train.config import validate
        from appliance.stages.train.recipe import load_model, pick_device

        cfg = validate({k: v for k, v in train_config.items() if k != "devices"})
        _, dtype = pick_device(cfg)
        base_model = load_model(base, cfg, "cpu", dtype if dtype != torch.float16 else torch.float32)
        base_model = base_model.unload() if hasattr(base_model, "unload") else base_model
        self.model = PeftModel.from_pretrained(base_model, str(adapter)).eval()


class CancellableScorer:
    """A scorer that checks for a cancel request before each conversation it scores, so a cancel
    during a long parity run stops within one forward pass, and says when it has scored one."""

    def __init__(self, scorer: parity.Scorer, report: Reporter,
                 scored: Callable[[], None] = lambda: None) -> None:
        self.scorer, self.report, self.scored = scorer, report, scored

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.report.check_cancel()
        out = self.scorer.logits(ids)
        self.scored()
        return out

    def logits_at(self, ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        self.report.check_cancel()
        out = parity.logits_at(self.scorer, ids, positions)
        self.scored()
        return out


def _scoring(stages: Stages, label: str, total: int) -> Callable[[], None]:
    """A `score` stage of `total` conversations, counted one call at a time."""
    count, done = stages.counter("score", label, "conversations", total), itertools.count(1)
    return lambda: count(next(done), total)


class Candidate(NamedTuple):
    """What is scored against the reference: its type (`q8_0`, `int4`, `adapter`), its scorer, and
    whether its runtime tokenizes like the reference (None: not checked)."""

    kind: str
    scorer: parity.Scorer
    tokens_identical: bool | None = None


ReferenceRows = tuple[list[Any], str]  # the reference's logits rows per conversation, its dtype


class ReferenceMemo:
    """The reference's logits rows of one job, keyed by the reference artifact's name and the scored
    data's digest: an export job merges (scoring the adapter model against the merged one), then
    gates each artifact against the same merged model on the same data. One entry: a job has one
    reference."""

    def __init__(self) -> None:
        self.entry: tuple[tuple[str, str], ReferenceRows] | None = None

    def get(self, key: tuple[str, str]) -> ReferenceRows | None:
        return self.entry[1] if self.entry is not None and self.entry[0] == key else None


class Scoring:
    """One job's scoring against its reference. `gating`: each candidate judged against its type's
    thresholds (with `overrides`); not gating (the adapter model vs the merged one): reported as
    informational. Either way the reference's logits go to `memo` for the job's next scoring."""

    def __init__(self, stages: Stages, report: Reporter = QUIET, *,
                 overrides: Mapping[str, float] | None = None, gating: bool = True,
                 memo: ReferenceMemo | None = None) -> None:
        self.stages, self.report, self.gating = stages, report, gating
        self.overrides = dict(overrides or {})
        self.memo = memo or ReferenceMemo()

    def parity_report(self, reference_dir: Path, reference_name: str, data: list[parity.Sample],
                      candidates: dict[str, Candidate]) -> dict[str, Any]:
        """The reference scored (or reused) and each candidate against it: a `parity.json`."""
        rows, dtype = self.reference_rows(reference_dir, data, reference_name)
        ref = parity.Score()
        for s, r in zip(data, rows, strict=True):
            ref.add(r, r, s.targets)
        results = []
        for name, candidate in candidates.items():
            self.report.log(f"scoring {name}")
            scored = _scoring(self.stages, f"scoring {candidate.kind}", len(data))
            score = parity.score(CancellableScorer(candidate.scorer, self.report, scored), data, rows)
            result = parity.judge(name, candidate.kind, score, ref, candidate.tokens_identical,
                                  self.overrides)
            if not self.gating:  # reported, not judged: e.g. the adapter model as trained vs merged
                result.passed, result.reasons = None, ["informational"]
            results.append(result)
        return {"reference": {"name": reference_name or reference_dir.name,
                              "perplexity": round(ref.perplexity, 4),
                              "dtype": dtype},
                "conversations": len(data), "tokens": ref.count,
                "artifacts": [r.__dict__ for r in results],
                "passed": all(r.passed is not False for r in results)}

    def reference_rows(self, reference_dir: Path, data: list[parity.Sample], name: str = "") -> ReferenceRows:
        """The reference's logits rows on `data`: kept from this job's earlier scoring of the same
        reference (`name`: its artifact name, the folder's name without one) or computed."""
        import hashlib

        import numpy as np

        digest = hashlib.sha256()
        for sample in data:
            digest.update(np.asarray(sample.input_ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(sample.positions, dtype=np.int64).tobytes())
        key = (name or reference_dir.name, digest.hexdigest())
        kept = self.memo.get(key)
        if kept is not None:
            self.report.log("reference: scored earlier in this job, reused")
            return kept
        self.stages.emit("load-reference",
                         f"loading the reference {reference_dir.name} (merged) to score against")
        reference = HFScorer(reference_dir)
        scored = _scoring(self.stages, "scoring the reference (merged)", len(data))
        rows = parity.reference_rows(CancellableScorer(reference, self.report, scored), data)
        self.report.log(f"reference scored: {len(data)} held-out conversations")
        found = rows, str(reference.dtype).removeprefix("torch.")
        self.memo.entry = (key, found)
        return found
