"""One job's scoring (`appliance.stages.verify.scoring.Scoring`) without a model: the reference is
scored once per gating job and its rows kept for the job's next artifact, never kept by a
non-gating one (the merge's adapter check), never shared between two jobs; every conversation is
preceded by a cancel check through the reporter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from appliance.jobs import JobCancelled
from appliance.progress import Quiet, Stages
from appliance.stages.verify import parity, scoring

VOCAB = 8
LOADS: list[Path] = []  # the folders the (fake) reference scorer was loaded from


class Fixed:
    """A scorer whose logits favour token (id + 1) % VOCAB: the same for any instance."""

    def __init__(self, folder: Path | None = None) -> None:
        if folder is not None:
            LOADS.append(folder)
        self.dtype = "torch.float32"

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        out = np.zeros((len(ids), VOCAB), dtype=np.float32)
        out[np.arange(len(ids)), (np.asarray(ids) + 1) % VOCAB] = 5.0
        return out


class Recorder(Quiet):
    def __init__(self, cancel_after: int | None = None) -> None:
        self.lines: list[str] = []
        self.checks = 0
        self.cancel_after = cancel_after

    def log(self, message: str) -> None:
        self.lines.append(message)

    def check_cancel(self) -> None:
        self.checks += 1
        if self.cancel_after is not None and self.checks > self.cancel_after:
            raise JobCancelled("cancel requested")


DATA = [parity.Sample([1, 2, 3, 4], [0, 1, 2], [2, 3, 4]), parity.Sample([5, 6, 7], [0, 1], [6, 7])]


@pytest.fixture(autouse=True)
def fake_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    LOADS.clear()
    monkeypatch.setattr(scoring, "HFScorer", Fixed)


def _report(job: scoring.Scoring, name: str) -> dict:
    return job.parity_report(Path("/ws/exports/r-merged"), "r-merged", DATA,
                             {name: scoring.Candidate("q8_0", Fixed(), True)})


def test_a_gating_job_scores_its_reference_once_for_all_its_artifacts() -> None:
    reporter = Recorder()
    job = scoring.Scoring(Stages(reporter.progress), reporter)
    first, second = _report(job, "r-gguf-f16"), _report(job, "r-gguf-q8_0")
    assert len(LOADS) == 1
    assert "reference: scored earlier in this job, reused" in reporter.lines
    assert first["reference"] == second["reference"] == {"name": "r-merged", "perplexity":
                                                         first["reference"]["perplexity"],
                                                         "dtype": "float32"}
    assert first["passed"] and second["artifacts"][0]["agreement"] == 1.0
    assert reporter.checks == 3 * len(DATA)  # the reference once, each artifact: one per conversation


def test_a_new_job_scores_the_reference_again() -> None:
    _report(scoring.Scoring(Stages()), "a")
    _report(scoring.Scoring(Stages()), "b")  # another job: nothing carried over
    assert len(LOADS) == 2


def test_the_merges_informational_scoring_hands_its_reference_to_the_jobs_gate() -> None:
    """An export job that merges first scores the adapter model against the merged one, then gates
    each artifact against the same merged model on the same data: one reference scoring."""
    memo = scoring.ReferenceMemo()
    row = _report(scoring.Scoring(Stages(), gating=False, memo=memo), "adapter")["artifacts"][0]
    assert row["passed"] is None and row["reasons"] == ["informational"]
    gated = _report(scoring.Scoring(Stages(), memo=memo), "r-gguf-q8_0")
    assert len(LOADS) == 1 and gated["passed"] is True
    other = scoring.Scoring(Stages(), memo=memo)  # another reference, or other data: scored anew
    other.parity_report(Path("/ws/exports/s-merged"), "s-merged", DATA,
                        {"s": scoring.Candidate("q8_0", Fixed(), True)})
    other.parity_report(Path("/ws/exports/s-merged"), "s-merged", DATA[:1],
                        {"s": scoring.Candidate("q8_0", Fixed(), True)})
    assert len(LOADS) == 3


def test_a_cancel_stops_the_scoring_between_conversations() -> None:
    reporter = Recorder(cancel_after=1)
    with pytest.raises(JobCancelled):
        _report(scoring.Scoring(Stages(), reporter), "a")
    assert reporter.checks == 2
