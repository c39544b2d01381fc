"""What an export job is asked to do, with its defaults and choices defined once.

The CLI's `export gguf|onnx`, the TUI's export dialog and the demo build an `ExportRequest`;
`problems()` is checked before the job is queued (`appliance.api.start`), so a typo in a type is a
refusal naming the field, not a job that fails minutes later. `to_params()` / `from_params()` are
the job row's JSON (unknown keys of older rows are ignored). Only the standard library at module
scope: the CLI's `--help` and the TUI import it; the GGUF type check loads llama.cpp's table
lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

FORMATS = ("gguf", "onnx")
GGUF_OFFERED = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")  # ticked in the TUI; any llama.cpp type goes
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")  # export/onnx.py makes each (a test keeps them equal)
DEFAULT_TYPES: Mapping[str, tuple[str, ...]] = {"gguf": ("Q8_0", "Q4_K_M"), "onnx": ("int4",)}


@dataclass(frozen=True)
class ExportRequest:
    """A run to export to one format, as the given types (none: only the merged model)."""

    run: str
    format: str = "gguf"
    types: tuple[str, ...] = DEFAULT_TYPES["gguf"]
    overrides: Mapping[str, float] = field(default_factory=dict)  # parity threshold key -> value

    kind: ClassVar[str] = "export"

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued."""
        found: dict[str, str] = {}
        if not self.run:
            found["run"] = "pick a finished run"
        if self.format not in FORMATS:
            found["format"] = f"unknown format {self.format!r}; one of {', '.join(FORMATS)}"
        elif self.format == "onnx":
            bad = [t for t in self.types if t not in ONNX_PRECISIONS]
            if bad:
                found["types"] = f"unknown ONNX precision {bad[0]!r}; valid: {', '.join(ONNX_PRECISIONS)}"
        else:
            problem = _gguf_problem(self.types)
            if problem:
                found["types"] = problem
        return found

    def to_params(self) -> dict[str, Any]:
        return {"run": self.run, "format": self.format, "types": list(self.types),
                "overrides": dict(self.overrides)}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExportRequest:
        return cls(run=str(params.get("run") or ""), format=str(params.get("format") or "gguf"),
                   types=tuple(str(t) for t in params.get("types") or ()),
                   overrides={str(k): float(v) for k, v in (params.get("overrides") or {}).items()})


def _gguf_problem(types: tuple[str, ...]) -> str | None:
    from appliance.errors import ApplianceError
    from export.gguf import resolve_quant_type

    for name in types:
        try:
            resolve_quant_type(name)
        except ApplianceError as exc:
            return f"{exc.message} ({exc.hint})" if exc.hint else exc.message
    return None
