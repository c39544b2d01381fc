"""What a merge job is asked to do, with its choices defined once.

The CLI's `merge`, the TUI's merge dialog and the demo build a `MergeRequest`; `problems()` is
checked before the job is queued (`appliance.api`), so a wrong dtype is a refusal naming the field.
`to_params()` / `from_params()` are the job row's JSON (unknown keys of older rows are ignored).
Only the standard library at module scope: the CLI's `--help` and the TUI import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

DTYPES = ("auto", "fp32", "fp16", "bf16")  # auto: the dtype the base was stored in
BASES = ("full", "nf4")  # full: the base as imported; nf4: as training saw it (NF4 round trip)
DEFAULT_DTYPE = "auto"
DEFAULT_BASE = "full"


@dataclass(frozen=True)
class MergeRequest:
    """A run's adapter merged into its base. dtype/base None (older rows): whatever an existing
    merge of the run was made with, else the defaults."""

    run: str
    dtype: str | None = DEFAULT_DTYPE
    base: str | None = DEFAULT_BASE

    kind: ClassVar[str] = "merge"

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued."""
        found: dict[str, str] = {}
        if not self.run:
            found["run"] = "pick a finished run"
        if self.dtype is not None and self.dtype not in DTYPES:
            found["dtype"] = f"unknown dtype {self.dtype!r}; one of {', '.join(DTYPES)}"
        if self.base is not None and self.base not in BASES:
            found["base"] = f"unknown base {self.base!r}; one of {', '.join(BASES)}"
        return found

    def to_params(self) -> dict[str, Any]:
        return {"run": self.run, "dtype": self.dtype, "base": self.base}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> MergeRequest:
        dtype, base = params.get("dtype"), params.get("base")
        return cls(run=str(params.get("run") or ""), dtype=None if dtype is None else str(dtype),
                   base=None if base is None else str(base))
