"""Which weights an int4 ONNX export keeps at 8 bits (`export onnx --calibrate auto|off`), measured
on the run's own training conversations, and what the export's manifest records of it.

- `auto` (the default): each weight MatMul's sensitivity to int4 rounding is estimated on the
  run's training conversations (`export.sensitivity`: the model's Fisher information along the
  rounding error, from a few backward passes of the merged model), and the 8-bit bytes of the fixed
  layout (the head, every down and v projection) are spent where they buy the most: the head, then
  the most sensitive matrices per byte. Same size and speed as the fixed layout; on the demo run,
  +2.8-4.2% perplexity against +11.2% (bench/results/int4-calibration-cpu.md).
- `off`: the fixed layout, as before.
When it cannot be measured (no training conversation with an assistant turn, a graph whose
MatMuls do not match the model's modules) the export says why in its log and manifest and uses
the fixed layout.

Calibration: the first `CONVERSATIONS` training conversations with assistant tokens, rendered with
the model's chat template as training rendered them, up to `MAX_TOKENS` tokens each; scored at
their assistant tokens, as the parity gate scores the held-out ones. Hashed (sha256 of the
messages as canonical JSON, `importance.conversation_hash`); the manifest says which, without text.
The layout is measured once per export job into its scratch folder, so a resumed job reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import manifest
from appliance.errors import ApplianceError
from appliance.progress import Reporter, Stages
from appliance.stages.export.importance import conversation_hash
from appliance.stages.export.request import CALIBRATE_CHOICES as CHOICES
from appliance.stages.merge.inputs import run_inputs
from appliance.stages.verify.scoring import PARITY_MAX_TOKENS
from appliance.workspace import ArtifactRecord, Workspace

AUTO, OFF = CHOICES
CONVERSATIONS = 16
DRAWS = 2  # backward passes per conversation, each with labels drawn from the model
MAX_TOKENS = PARITY_MAX_TOKENS  # as the gate scores the held-out conversations
SEED = 0
LAYOUT_FILE = "int4-layout.json"  # beside the export: the conversations' hashes, the scores, the layout
FILE_KEYS = ("run", "dataset", "split", "conversation_sha256", "scores", "eight_bit")


@dataclass
class TrainingSamples:
    """The conversations the layout is measured on, and what identifies them."""

    samples: list[Any]       # export.sensitivity.Conversation
    hashes: list[str]
    dataset: ArtifactRecord
    conversations_total: int

    def record(self, run: str) -> dict[str, Any]:
        """What the manifest says of it: which conversations (by hash), not their text."""
        return {"run": run, "dataset": self.dataset.name, "split": "train",
                "dataset_manifest_sha256": self.dataset.manifest_sha256,
                "conversations": len(self.hashes), "conversations_total": self.conversations_total,
                "tokens": sum(len(s.positions) for s in self.samples), "max_tokens": MAX_TOKENS,
                "rendering": "the model's chat template",
                "conversations_sha256": hashlib.sha256("\n".join(self.hashes).encode()).hexdigest()}


def training_samples(ws: Workspace, run: str, tokenizer: Any) -> TrainingSamples:
    """The run's first `CONVERSATIONS` training conversations that have assistant tokens within
    `MAX_TOKENS`, as the parity gate renders and scores conversations."""
    from appliance.stages.datasets import importer as datasets
    from appliance.stages.verify import parity
    from export.sensitivity import Conversation

    _, model, dataset = run_inputs(ws, run, hash_model=False)
    stops = manifest.read(model.path)["info"]["stop_tokens"]
    rows = datasets.load_rows(dataset, "train")
    found = TrainingSamples([], [], dataset, len(rows))
    for row in rows:
        if len(found.samples) >= CONVERSATIONS:
            break
        for sample in parity.samples(tokenizer, [row["messages"]], stops, MAX_TOKENS):
            found.samples.append(Conversation(sample.input_ids, sample.positions))
            found.hashes.append(conversation_hash(row["messages"]))
    return found


@dataclass
class Layout:
    """The job's int4 layout: measured once, on first use (`choice` auto), or the fixed one."""

    ws: Workspace
    run: str
    choice: str
    scratch: Path
    stages: Stages
    report: Reporter
    _made: tuple[list[str] | None, dict[str, Any]] | None = None
    _file: dict[str, Any] | None = None  # the layout file's content, once measured

    def get(self, fp32: Path, merged: ArtifactRecord) -> tuple[list[str] | None, dict[str, Any]]:
        """(the MatMuls kept at 8 bits, or None for the fixed layout; the manifest's record)."""
        if self.choice == OFF:
            return None, {"used": False, "why": "--calibrate off"}
        if self._made is None:  # `reuse` (called first where a graph would be built for this) took none
            self._made = self._measure(fp32, merged)
        return self._made

    def reuse(self, merged: ArtifactRecord) -> bool:
        """Take the layout an export of the same merged model already measured (an int4 made before
        an int4-cuda, in another job): the same run, conversations, method, draws and seed give the
        same layout, without the fp32 graph and the backward passes again. True when taken."""
        if self.choice == OFF or self._made is not None:
            return self._made is not None
        for record in self.ws.list("export"):
            found = _measured_by(record, merged)
            if found is not None:
                keep, calibration = found
                self._file = {k: keep[k] for k in FILE_KEYS}
                self._made = keep["eight_bit"], {**calibration, "reused_from": record.name}
                self.report.log(f"int4 layout: the one measured for {record.name} (the same merged model "
                                f"and training conversations), {len(keep['eight_bit'])} matrices at 8 bits")
                return True
        return False

    def _measure(self, fp32: Path, merged: ArtifactRecord) -> tuple[list[str] | None, dict[str, Any]]:
        cached = self.scratch / LAYOUT_FILE
        if cached.is_file():  # a resumed job: measured before the cancel
            kept = json.loads(cached.read_text(encoding="utf-8"))
            if kept.get("merged_manifest_sha256") == merged.manifest_sha256:
                self._file = {k: kept[k] for k in FILE_KEYS}
                return kept["eight_bit"], kept["record"]
        keep, record, doc = self._compute(fp32, merged)
        if keep is not None:
            self._file = {**doc, "eight_bit": keep}
            self.scratch.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({**self._file, "record": record,
                                          "merged_manifest_sha256": merged.manifest_sha256},
                                         indent=1), encoding="utf-8")
        return keep, record

    def write_beside(self, folder: Path) -> None:
        """The layout file (hashes, scores, the layout) into an export made with the measured layout."""
        if self._file is not None:
            (folder / LAYOUT_FILE).write_text(json.dumps(self._file, indent=1), encoding="utf-8")

    def _fixed(self, why: str) -> tuple[None, dict[str, Any], dict[str, Any]]:
        self.report.log(f"{why}: the int4 export keeps the fixed layout (the head, down and v "
                        "projections) at 8 bits")
        return None, {"used": False, "why": why}, {}

    def _compute(self, fp32: Path, merged: ArtifactRecord
                 ) -> tuple[list[str] | None, dict[str, Any], dict[str, Any]]:
        """(the layout or None, the manifest's record, the layout file's content)."""
        from appliance.hfmodel import load_tokenizer
        from export import onnx

        calib = training_samples(self.ws, self.run, load_tokenizer(merged.path))
        if not calib.samples:
            return self._fixed(f"none of the run's {calib.conversations_total} training conversations "
                               f"has an assistant turn within its first {MAX_TOKENS} tokens")
        units = onnx.weight_units(fp32)
        total = len(calib.samples) * DRAWS
        count = self.stages.counter("calibrate", f"measuring each weight's int4 sensitivity on "
                                    f"{len(calib.samples)} training conversations", "passes", total)
        done = [0]

        def step() -> None:
            done[0] += 1
            count(done[0], total)
            self.report.check_cancel()

        self.report.log(f"measuring the int4 sensitivity of {len(units)} weight matrices on "
                        f"{len(calib.samples)} training conversations ({total} backward passes)")
        start = time.monotonic()
        scores = unit_scores(units, merged.path, calib.samples, step=step)
        if isinstance(scores, str):
            return self._fixed(scores)
        seconds = round(time.monotonic() - start, 1)
        keep, budget = choose(units, scores)
        self.report.log(f"int4 layout: {len(keep)} of {len(units)} weight matrices at 8 bits, the "
                        f"fixed layout's {budget / 2**20:.1f} MiB over 4 bits; measured in {seconds:.0f} s")
        record = {"used": True, "source": "run", "file": LAYOUT_FILE, "method": "fisher",
                  "draws": DRAWS, "seed": SEED, "budget_bytes": budget, "seconds": seconds,
                  "calibration": calib.record(self.run)}
        doc = {"run": self.run, "dataset": calib.dataset.name, "split": "train",
               "conversation_sha256": calib.hashes, "scores": scores}
        return keep, record, doc


def _measured_by(record: ArtifactRecord, merged: ArtifactRecord
                 ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(its layout file, its manifest's calibration record) when `record` is an export of `merged`
    whose layout this module measured as it would now; None otherwise (or if its files changed)."""
    path = record.path / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        data = manifest.verify(record.path, full=False)
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (ApplianceError, OSError, ValueError):
        return None
    parents = data.get("parents") or []
    calibration = (data.get("info") or {}).get("calibration") or {}
    same = (bool(parents) and parents[0].get("manifest_sha256") == merged.manifest_sha256
            and calibration.get("used") is True and calibration.get("source") == "run"
            and calibration.get("method") == "fisher" and calibration.get("draws") == DRAWS
            and calibration.get("seed") == SEED)
    if not same or not isinstance(kept, dict) or any(k not in kept for k in FILE_KEYS):
        return None
    return kept, calibration


def unit_scores(units: list[Any], merged: Path, samples: list[Any], *, seed: int = SEED,
                step: Callable[[], None] = lambda: None) -> dict[str, float] | str:
    """Each weight MatMul's (`export.onnx.WeightUnit`) estimated KL increase at int4, by node name;
    or why it cannot be measured (the graph's MatMuls do not match the model's modules)."""
    from export import sensitivity

    model = _load(merged)
    modules = dict(model.named_modules())
    unmatched = [u.name for u in units if not _matches(modules.get(u.module), u)]
    if unmatched:
        return (f"{len(unmatched)} of the graph's {len(units)} weight MatMuls do not match the "
                f"model's layers (e.g. {unmatched[0]})")
    by_module = sensitivity.scores(model, {u.module: modules[u.module] for u in units}, samples,
                                   draws=DRAWS, seed=seed, step=step)
    return {u.name: by_module[u.module] for u in units}


def choose(units: list[Any], scores: dict[str, float]) -> tuple[list[str], int]:
    """The MatMuls kept at 8 bits, spending the fixed layout's bytes (the head, every down and v
    projection: `export.onnx.INT4_KEEP_8BIT`) by sensitivity per byte, the head first; and that
    budget in bytes. The same size as the fixed layout, so the same decode speed."""
    from export import onnx, sensitivity

    saved = {u.name: sensitivity.nbits_bytes(u.k, u.n, 8) - sensitivity.nbits_bytes(u.k, u.n, 4)
             for u in units}
    head = [u.name for u in units if u.head]
    budget = sum(saved[n] for n in onnx.fixed_8bit([u.name for u in units], head[0] if head else None))
    return sensitivity.keep_at_8_bits(scores, saved, budget, always=head), budget


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    from appliance.stages.merge.weights import scoring_dtype

    # the model and a bf16 copy of each matrix's rounding error (half an fp32 copy)
    dtype = scoring_dtype(folder, copies=2)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False).eval()


def _matches(module: Any, unit: Any) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and tuple(weight.shape) == (unit.n, unit.k)


def existing_mismatch(record_info: dict[str, Any], measured: bool) -> str | None:
    """How an int4 export found in the workspace differs from what this job would make."""
    had = bool((record_info.get("calibration") or {}).get("used"))
    if had != measured:
        return f"made with {'a measured' if had else 'the fixed'} 8-bit layout"
    return None
