"""The importance matrix of a GGUF export (`export gguf --imatrix auto|off|FILE`): when one is used,
what it is made from, and what the export's manifest records of it.

- `plan`: which of the job's types use one. `auto` (the default) makes one for the types below
  6 bits (`export.gguf.imatrix_helps`) when llama.cpp's tools are installed, and otherwise
  quantizes as before with one log line saying how to get them; `off` never does; a FILE is used
  as given. Types that need one (`export.gguf.NEEDS_IMATRIX`) and a FILE without the tools are
  refused up front, before any work.
- `calibration`: the text it is computed from: the run's own training conversations (its
  dataset's train split, in order), rendered with the model's chat template exactly as training
  rendered them, up to `MAX_TOKENS` (whole conversations). Each conversation is hashed (sha256
  of its messages as canonical JSON) so the manifest says which ones, without copying any text.
- `Source`: computes the matrix once per export job (in the job's scratch folder, so a resumed
  job finds it) and hands the same file to every type of the job.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import chat, stack
from appliance.errors import ApplianceError, NotFoundError, RefusedError
from appliance.fsutil import sha256_file
from appliance.progress import Reporter, Stages
from appliance.stages.merge.inputs import run_inputs
from appliance.workspace import Workspace

AUTO, OFF = "auto", "off"
# Windows of CHUNK tokens at most (16,384 tokens). On the demo run the Q4_K_M/Q5_K_M KL was the same
# from 8 windows to all 147 (0.037-0.038 / 0.015-0.017, bench/results/imatrix-chunks-cpu.md) while the
# time grew with them: 32 take 30 s on the 2-core box, 147 took 155 s (a 7B on a CPU: hours).
CHUNKS_MAX = 32
CALIBRATION_FILE = "imatrix-calibration.json"  # beside the GGUF: the conversations' hashes
IMATRIX_FILE = "imatrix.gguf"


def conversation_hash(messages: Any) -> str:
    """sha256 of a conversation's messages as canonical JSON (sorted keys, no spaces, UTF-8)."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Plan:
    """What the job does: the types quantized with an importance matrix, from `file` (None: made
    from the run's training conversations); `why_not` says why the others are not."""

    choice: str
    types: frozenset[str]
    file: Path | None = None
    why_not: str = ""

    def reason(self, qtype: str) -> str:
        from export import gguf

        if self.choice == OFF:
            return "--imatrix off"
        if not gguf.imatrix_helps(qtype):
            return f"{qtype} has 6 bits or more per weight"
        return self.why_not


def plan(choice: str, names: Iterable[str], say: Callable[[str], None]) -> Plan:
    """The plan for `choice` (auto, off or a file) and the job's canonical type names; refuses
    (RefusedError/NotFoundError/ValidationError, naming the type or file) what cannot be done."""
    from export import gguf, imatrix

    names = list(names)
    if choice == OFF:
        for name in names:
            gguf.refuse_without_imatrix(name)
        return Plan(OFF, frozenset())
    wanted = frozenset(n for n in names if gguf.imatrix_helps(n))
    missing = stack.llama_tools_missing()
    if missing and (choice != AUTO or wanted & gguf.NEEDS_IMATRIX):
        needs = sorted(wanted & gguf.NEEDS_IMATRIX)
        what = f"{', '.join(needs)} need(s) an importance matrix" if needs else f"--imatrix {choice}"
        raise NotFoundError(f"{what}, but llama.cpp's {' and '.join(missing)} are not installed",
                            hint=stack.TOOLS_HINT)
    if choice == AUTO:
        if missing and wanted:
            why = f"llama.cpp's {' and '.join(missing)} are not installed"
            say(f"{why}: quantizing {', '.join(sorted(wanted))} without an importance matrix; "
                f"to get one, {stack.TOOLS_HINT}")
            return Plan(AUTO, frozenset(), why_not=why)
        return Plan(AUTO, wanted)
    path = Path(choice).expanduser()
    imatrix.read_imatrix(path)  # a file that is no imatrix is refused here, naming it
    return Plan(choice, wanted, file=path.resolve())


@dataclass
class Calibration:
    """The calibration text and what identifies it."""

    text: str
    run: str
    dataset: str
    dataset_manifest_sha256: str
    conversations_total: int
    tokens: int
    hashes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"run": self.run, "dataset": self.dataset, "split": "train",
                "dataset_manifest_sha256": self.dataset_manifest_sha256,
                "conversations": len(self.hashes), "conversations_total": self.conversations_total,
                "tokens": self.tokens, "rendering": "the model's chat template",
                "conversations_sha256": hashlib.sha256("\n".join(self.hashes).encode()).hexdigest(),
                "text_sha256": hashlib.sha256(self.text.encode("utf-8")).hexdigest(),
                "hashes_file": CALIBRATION_FILE}


def calibrate(rows: list[dict[str, Any]], tokenizer: Any, *, max_tokens: int) -> Calibration:
    """Conversations (dataset rows) rendered with the tokenizer's chat template, whole ones in
    order up to `max_tokens` tokens (the model's own tokenizer counts)."""
    parts: list[str] = []
    found = Calibration("", "", "", "", len(rows), 0)
    for row in rows:
        text = chat.render(tokenizer, row["messages"])
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if found.tokens + n > max_tokens:
            break
        parts.append(text)
        found.hashes.append(conversation_hash(row["messages"]))
        found.tokens += n
    found.text = "".join(parts)
    return found


def calibration(ws: Workspace, run: str, tokenizer: Any, *, max_tokens: int) -> Calibration:
    """`calibrate` over the run's training conversations (its dataset's train split)."""
    from appliance.stages.datasets import importer as datasets

    _, _, dataset = run_inputs(ws, run, hash_model=False)
    found = calibrate(datasets.load_rows(dataset, "train"), tokenizer, max_tokens=max_tokens)
    found.run, found.dataset, found.dataset_manifest_sha256 = run, dataset.name, dataset.manifest_sha256
    return found


@dataclass
class Source:
    """The job's importance matrix, made (or checked) once, on first use."""

    ws: Workspace
    run: str
    plan: Plan
    scratch: Path
    stages: Stages
    report: Reporter
    _made: tuple[Path, dict[str, Any]] | None = None
    _failed: str = ""

    def get(self, base: Path, merged: Path, qtype: str) -> tuple[Path, dict[str, Any]] | None:
        """(the imatrix file, its manifest record) for `qtype`, or None when it is quantized without
        one (recorded why); a type that needs one and cannot have it raises."""
        from export import gguf

        if qtype not in self.plan.types:
            return None
        if self._made is None and not self._failed:
            self._made = self._from_file() if self.plan.file else self._compute(base, merged)
        if self._made is None:
            if qtype in gguf.NEEDS_IMATRIX:
                raise RefusedError(f"{qtype} needs an importance matrix, and none could be made: "
                                   f"{self._failed}", hint="add training conversations to the run's "
                                   "dataset, or give one with --imatrix FILE")
            return None
        return self._made

    def reason(self, qtype: str) -> str:
        return self._failed or self.plan.reason(qtype)

    def _from_file(self) -> tuple[Path, dict[str, Any]]:
        from export import imatrix

        assert self.plan.file is not None
        info = imatrix.read_imatrix(self.plan.file)
        return self.plan.file, {"used": True, "source": "file", "path": str(self.plan.file),
                                "sha256": sha256_file(self.plan.file), **info,
                                "tool": imatrix.tool_version()}

    def _compute(self, base: Path, merged: Path) -> tuple[Path, dict[str, Any]] | None:
        from appliance.hfmodel import load_tokenizer
        from export import imatrix

        calib = calibration(self.ws, self.run, load_tokenizer(merged),
                            max_tokens=CHUNKS_MAX * imatrix.CHUNK)
        if calib.tokens < 2 * imatrix.CHUNK:
            self._failed = (f"the run's training conversations make {calib.tokens} tokens; "
                            f"llama-imatrix needs at least {2 * imatrix.CHUNK}")
            self.report.log(f"{self._failed}: quantizing without an importance matrix")
            return None
        out, text_file = self.scratch / IMATRIX_FILE, self.scratch / f"{self.run}-train.txt"
        self.report.check_cancel()
        start = time.monotonic()
        if not out.is_file():  # a resumed job finds the one it made before the cancel
            text_file.write_text(calib.text, encoding="utf-8")
            count = self.stages.counter("imatrix", f"computing the importance matrix over "
                                        f"{len(calib.hashes)} training conversations", "chunks")
            imatrix.compute(base, text_file, out, progress=self.report.log, counts=count)
        info = imatrix.read_imatrix(out)
        (self.scratch / CALIBRATION_FILE).write_text(json.dumps(
            {"run": self.run, "dataset": calib.dataset, "split": "train",
             "conversation_sha256": calib.hashes}, indent=1), encoding="utf-8")
        record = {"used": True, "source": "run", "sha256": sha256_file(out), **info,
                  "calibration": calib.record(), "tool": imatrix.tool_version(),
                  "seconds": round(time.monotonic() - start, 1)}
        return out, record


def existing_mismatch(record_info: dict[str, Any], uses: bool, sha256: str | None) -> str | None:
    """How an export found in the workspace differs from what this job would make (None: same)."""
    had = record_info.get("imatrix") or {}
    if bool(had.get("used")) != uses:
        return f"made {'with' if had.get('used') else 'without'} an importance matrix"
    if uses and sha256 is not None and had.get("sha256") != sha256:
        return "made with another importance matrix"
    return None


def refuse_mismatch(name: str, why: str) -> ApplianceError:
    return ApplianceError(f"{name} exists, {why}", title="Export exists",
                          hint=f"remove it (appliance exports rm {name}) and export again")
