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
PLAN = "plan"  # both formats in one job (`export plan`): GGUF types first, then ONNX precisions
GGUF_OFFERED = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")  # ticked in the TUI; any llama.cpp type goes
# export/onnx.py makes each (a test keeps them equal); fp16 and int4-cuda are the CUDA ones
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4", "int4-cuda")
DEFAULT_TYPES: Mapping[str, tuple[str, ...]] = {"gguf": ("Q8_0", "Q4_K_M"), "onnx": ("int4",)}
# `export plan`: the candidates a CPU or T4-class box serves, from lossless-ish to 4 bits
PLAN_TYPES: Mapping[str, tuple[str, ...]] = {"gguf": ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"),
                                             "onnx": ("int8", "int4")}
IMATRIX_CHOICES = ("auto", "off")  # or the path of an importance-matrix file (GGUF export only)
DEFAULT_IMATRIX = "auto"
CALIBRATE_CHOICES = ("auto", "off")  # int4 ONNX's 8-bit layout (appliance.stages.export.layout)
DEFAULT_CALIBRATE = "auto"


@dataclass(frozen=True)
class ExportRequest:
    """A run to export to one format, as the given types (none: only the merged model); or, with
    format `plan`, to both: the ONNX precisions among the types in ONNX, the rest in GGUF."""

    run: str
    format: str = "gguf"
    types: tuple[str, ...] = DEFAULT_TYPES["gguf"]
    overrides: Mapping[str, float] = field(default_factory=dict)  # parity threshold key -> value
    imatrix: str = DEFAULT_IMATRIX  # auto | off | FILE (appliance.stages.export.importance)
    calibrate: str = DEFAULT_CALIBRATE  # auto | off: int4 ONNX's 8-bit layout measured or fixed

    kind: ClassVar[str] = "export"

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued."""
        found: dict[str, str] = {}
        if not self.run:
            found["run"] = "pick a finished run"
        if self.format not in (*FORMATS, PLAN):
            found["format"] = f"unknown format {self.format!r}; one of {', '.join(FORMATS)}"
        elif self.format in FORMATS and not self.types:
            found["types"] = "name at least one " + (
                "quantization type, e.g. Q4_K_M" if self.format == "gguf" else "precision, e.g. int4")
        elif self.format == PLAN:
            found.update(_plan_problems(self))
        elif self.format == "onnx":
            bad = [t for t in self.types if t not in ONNX_PRECISIONS]
            if bad:
                found["types"] = f"unknown ONNX precision {bad[0]!r}; valid: {', '.join(ONNX_PRECISIONS)}"
            if self.imatrix != DEFAULT_IMATRIX:
                found["imatrix"] = "an importance matrix is for GGUF exports only"
            found.update(_calibrate_problem(self.calibrate))
        else:
            found.update(_gguf_problems(self.types, self.imatrix))
            if self.calibrate != DEFAULT_CALIBRATE:
                found["calibrate"] = ("the measured 8-bit layout is for ONNX int4 exports; GGUF types "
                                      "below 6 bits use an importance matrix (imatrix)")
        return found

    def to_params(self) -> dict[str, Any]:
        return {"run": self.run, "format": self.format, "types": list(self.types),
                "overrides": dict(self.overrides),
                **({"imatrix": self.imatrix} if self.format in ("gguf", PLAN) else {}),
                **({"calibrate": self.calibrate} if self.format in ("onnx", PLAN) else {})}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ExportRequest:
        return cls(run=str(params.get("run") or ""), format=str(params.get("format") or "gguf"),
                   types=tuple(str(t) for t in params.get("types") or ()),
                   overrides={str(k): float(v) for k, v in (params.get("overrides") or {}).items()},
                   imatrix=str(params.get("imatrix") or DEFAULT_IMATRIX),
                   calibrate=str(params.get("calibrate") or DEFAULT_CALIBRATE))


def split_types(types: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """A plan's types: (GGUF types, ONNX precisions), each in the order given."""
    return [t for t in types if t not in ONNX_PRECISIONS], [t for t in types if t in ONNX_PRECISIONS]


def types_by_format(fmt: str, types: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """An export job's (GGUF types, ONNX precisions): all of one kind for gguf/onnx, split for a plan."""
    if fmt == PLAN:
        return split_types(types)
    return (list(types), []) if fmt == "gguf" else ([], list(types))


def _plan_problems(request: ExportRequest) -> dict[str, str]:
    gguf, onnx = split_types(request.types)
    if not gguf and not onnx:
        return {"types": "give at least one candidate: GGUF types and/or ONNX precisions"}
    found = _gguf_problems(tuple(gguf), request.imatrix) if gguf else {}
    if "types" in found:
        found["types"] += f" (nor an ONNX precision: {', '.join(ONNX_PRECISIONS)})"
    return {**found, **_calibrate_problem(request.calibrate)}


def _calibrate_problem(calibrate: str) -> dict[str, str]:
    if calibrate in CALIBRATE_CHOICES:
        return {}
    return {"calibrate": f"unknown choice {calibrate!r}; one of {', '.join(CALIBRATE_CHOICES)}"}


def _message(exc: Any) -> str:
    return f"{exc.message} ({exc.hint})" if exc.hint else exc.message


def _gguf_problems(types: tuple[str, ...], imatrix: str) -> dict[str, str]:
    """The types' and the importance matrix's problems: an unknown type, a type that needs an
    imatrix where none will be made, a FILE that is not one, the tools missing for a FILE."""
    from appliance.errors import ApplianceError
    from appliance.stages.export.importance import plan
    from export.gguf import resolve_quant_type

    names = []
    for name in types:
        try:
            names.append(resolve_quant_type(name)[0])
        except ApplianceError as exc:
            return {"types": _message(exc)}
    if not imatrix.strip():
        return {"imatrix": f"give {' or '.join(IMATRIX_CHOICES)} or the path of an imatrix file"}
    try:
        plan(imatrix, names, lambda _: None)
    except ApplianceError as exc:
        field_name = "imatrix" if imatrix not in IMATRIX_CHOICES else "types"
        return {field_name: _message(exc)}
    return {}
