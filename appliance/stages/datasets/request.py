"""What a data import is asked to do, with its choices and defaults defined once.

The CLI's `data import` and the TUI's import dialog build an `ImportDatasetRequest`; `problems()`
names each bad field before the file is read (a missing file, an unknown format, an eval fraction
out of range, a bad name), so the dialog shows it at its field and the CLI refuses in one line.
The import runs in the caller's process (`importer.run`), not as a job; `to_params()` /
`from_params()` keep the same shape as the other stages' requests (older keys are ignored) so it
can become one. Only the standard library and the core at module scope.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from appliance.errors import ValidationError
from appliance.workspace import check_name

FORMS = ("messages", "sharegpt", "alpaca", "dolly")  # the JSONL forms the importer reads
FORMATS = ("auto", *FORMS)  # auto: each line's form is recognised
DEFAULT_FORMAT = "auto"
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ImportDatasetRequest:
    """`path` (a JSONL file) measured for `model` (its tokenizer and chat template)."""

    path: str
    model: str
    name: str | None = None
    form: str = DEFAULT_FORMAT
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    seed: int = DEFAULT_SEED
    max_tokens: int | None = None  # None: the model's context length
    license: str | None = None  # an SPDX id (else what the texts beside the file say, or unknown)
    attribution: str | None = None  # the line that credits the data's authors

    kind: ClassVar[str] = "import-dataset"

    @classmethod
    def for_path(cls, path: str | Path, model: str, **options: Any) -> ImportDatasetRequest:
        """A request with `path` made absolute (it names the source in the dataset's manifest)."""
        text = str(path).strip()
        return cls(str(Path(text).expanduser().resolve()) if text else "", model, **options)

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the import can start."""
        found: dict[str, str] = {}
        source = Path(self.path) if self.path else None
        if source is None:
            found["path"] = "give a JSONL file"
        elif not source.exists():
            found["path"] = f"{self.path} does not exist; give the path of a JSONL file"
        elif not source.is_file():
            found["path"] = f"{self.path} is not a file"
        if not self.model:
            found["model"] = "pick the model whose tokenizer and template measure the data"
        if self.form not in FORMATS:
            found["form"] = f"unknown format {self.form!r}; one of {', '.join(FORMATS)}"
        if not (isinstance(self.eval_fraction, int | float) and math.isfinite(self.eval_fraction)
                and 0 <= self.eval_fraction < 1):
            found["eval_fraction"] = f"must be in [0, 1), got {self.eval_fraction!r}"
        if self.license is not None and not re.fullmatch(r"[A-Za-z0-9.+-]{1,64}", self.license):
            found["license"] = f"{self.license!r} is not a licence id (e.g. CC-BY-SA-3.0, MIT)"
        if self.max_tokens is not None and self.max_tokens < 1:
            found["max_tokens"] = f"must be at least 1, got {self.max_tokens}"
        if self.name:
            try:
                check_name(self.name, "dataset name")
            except ValidationError as exc:
                found["name"] = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        return found

    def to_params(self) -> dict[str, Any]:
        return {"path": self.path, "model": self.model, "name": self.name, "form": self.form,
                "eval_fraction": self.eval_fraction, "seed": self.seed, "max_tokens": self.max_tokens,
                "license": self.license, "attribution": self.attribution}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ImportDatasetRequest:
        fraction, seed, limit = params.get("eval_fraction"), params.get("seed"), params.get("max_tokens")
        return cls(path=str(params.get("path") or ""), model=str(params.get("model") or ""),
                   name=str(params["name"]) if params.get("name") else None,
                   form=str(params.get("form") or DEFAULT_FORMAT),
                   eval_fraction=DEFAULT_EVAL_FRACTION if fraction is None else float(fraction),
                   seed=DEFAULT_SEED if seed is None else int(seed),
                   max_tokens=None if limit is None else int(limit),
                   license=str(params["license"]) if params.get("license") else None,
                   attribution=str(params["attribution"]) if params.get("attribution") else None)
