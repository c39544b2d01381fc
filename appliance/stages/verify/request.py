"""What a verify job is asked to do: an export's parity gate run again, with optional thresholds.

The CLI's `verify`, the TUI's Exports screen (`v`) build a `VerifyRequest`; `problems()` is checked
before the job is queued (`appliance.api`). `to_params()` / `from_params()` are the job row's JSON
(unknown keys of older rows are ignored). Only the standard library at module scope.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from appliance.errors import InvalidRequest

# The parity thresholds an operator may override (`parity.Threshold`'s fields; a test keeps them equal).
THRESHOLD_KEYS = ("ppl_increase", "kl", "agreement")


@dataclass(frozen=True)
class VerifyRequest:
    """An export measured again against its merged model; `overrides`: threshold key -> value."""

    export: str
    overrides: Mapping[str, float] = field(default_factory=dict)

    kind: ClassVar[str] = "verify"

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued."""
        found: dict[str, str] = {}
        if not self.export:
            found["export"] = "pick an export"
        problem = threshold_problem(self.overrides)
        if problem:
            found["overrides"] = problem
        return found

    def to_params(self) -> dict[str, Any]:
        return {"export": self.export, "overrides": dict(self.overrides)}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> VerifyRequest:
        """Raises `InvalidRequest` (field `overrides`) for a threshold that is not a number."""
        return cls(export=str(params.get("export") or ""),
                   overrides=thresholds(params.get("overrides")))


def thresholds(raw: Any) -> dict[str, float]:
    """Threshold overrides as stored (key -> number) as floats; a value that is not a number is
    refused naming the field."""
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidRequest("the thresholds are not valid",
                             {"overrides": f"expected key -> number, got {raw!r}"})
    out: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest("the thresholds are not valid",
                                 {"overrides": f"{key}: must be a number, got {value!r}"})
        out[str(key)] = float(value)
    return out


def threshold_problem(overrides: Mapping[str, float]) -> str | None:
    """What is wrong with threshold overrides (unknown key, out of range), or None."""
    for key, value in overrides.items():
        if key not in THRESHOLD_KEYS:
            return f"unknown threshold {key!r}; one of {', '.join(THRESHOLD_KEYS)}"
        if not math.isfinite(value) or value < 0 or (key == "agreement" and value > 1):
            limit = "between 0 and 1" if key == "agreement" else "a number >= 0"
            return f"{key}: must be {limit}, got {value:g}"
    return None
