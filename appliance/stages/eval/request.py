"""What an eval job is asked to do (`EvalRequest`): the targets, the held-out data, how many items,
how long an answer may be, and optionally a judge model with its rubric. Only the standard library
and the core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from appliance.stages.eval import rubric as rubrics
from appliance.workspace import name_problem

TARGET_KINDS = ("model", "run", "export")  # a target may be written KIND:NAME to pick one
MAX_TARGETS = 8
DEFAULT_LIMIT = 16
MAX_LIMIT = 10_000
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS = 4096
DEFAULT_SEED = 0


def split_target(target: str) -> tuple[str | None, str]:
    """`KIND:NAME` -> (kind, name); a plain name -> (None, name)."""
    kind, sep, name = target.partition(":")
    return (kind, name) if sep and kind in TARGET_KINDS else (None, target)


@dataclass(frozen=True)
class EvalRequest:
    """`targets`: model, run or export names (the first is the base the others are compared with);
    `data`: a dataset name (its eval split) or an absolute path to a JSONL file in any import form
    ("" = the dataset of the first target trained on one); `limit`: the first N items;
    `name`: the eval artifact's name (default `eval-<job id>`); `judge`: a GGUF that compares each
    target's answers with the base's (an export name, a model imported from a GGUF, or an absolute
    path to a .gguf; "" = no judge); `rubric`: an absolute path to the judge's prompt ("" = the
    default rubric)."""

    targets: tuple[str, ...] = field(default_factory=tuple)
    data: str = ""
    limit: int = DEFAULT_LIMIT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = DEFAULT_SEED
    name: str | None = None
    judge: str = ""
    rubric: str = ""

    kind: ClassVar[str] = "eval"

    @classmethod
    def make(cls, targets: list[str], data: str | None = None, **values: Any) -> EvalRequest:
        """A request from the command line: a `data`, `judge` or `rubric` that is an existing file
        becomes its absolute path (a job runs in another folder)."""
        for key in ("judge", "rubric"):
            if values.get(key):
                values[key] = _absolute(values[key])
        return cls(tuple(targets), _absolute(data), **{k: v for k, v in values.items() if v is not None})

    def problems(self) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued."""
        found: dict[str, str] = {}
        if not self.targets:
            found["targets"] = "name at least one target: a model, a run or an export"
        elif len(self.targets) > MAX_TARGETS:
            found["targets"] = f"at most {MAX_TARGETS} targets, got {len(self.targets)}"
        elif len(set(self.targets)) != len(self.targets):
            found["targets"] = "a target is named twice"
        for target in self.targets:
            if why := name_problem(split_target(target)[1], "target name"):
                found["targets"] = why
        if self.data and not Path(self.data).is_absolute() and (
                why := name_problem(self.data, "dataset name")):
            found["data"] = why
        elif self.data and Path(self.data).is_absolute() and not Path(self.data).is_file():
            found["data"] = f"{self.data} is not a file"
        elif self.data and Path(self.data).is_absolute() and Path(self.data).stat().st_size == 0:
            found["data"] = f"{self.data} is empty: it holds no conversations to evaluate on"
        for key, low, high in (("limit", 1, MAX_LIMIT), ("max_new_tokens", 1, MAX_NEW_TOKENS),
                               ("seed", 0, 2**32 - 2)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                found[key] = f"must be an integer from {low} to {high}, got {value!r}"
        if self.name and (why := name_problem(self.name, "eval name")):
            found["name"] = why
        found.update(self._judge_problems())
        return found

    def _judge_problems(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if not isinstance(self.judge, str) or not isinstance(self.rubric, str):
            return {"judge": "judge and rubric must be strings"}
        if self.judge and ("/" in self.judge or self.judge.endswith(".gguf")):
            if not Path(self.judge).is_absolute() or not Path(self.judge).exists():
                found["judge"] = f"{self.judge} does not exist (a judge is a .gguf file, an export " \
                                 "or a model imported from a GGUF)"
        elif self.judge and (why := name_problem(self.judge, "judge name")):
            found["judge"] = why
        if self.judge and isinstance(self.targets, tuple) and len(self.targets) < 2:
            found.setdefault("judge", "a judge compares each target with the first (the base): "
                                      "name at least two targets")
        if self.rubric and not self.judge:
            found["rubric"] = "a rubric is for a judge: name one (--judge MODEL_OR_EXPORT)"
        elif self.rubric and not Path(self.rubric).is_absolute():
            found["rubric"] = f"{self.rubric} is not an absolute path"
        elif self.rubric and (why := rubrics.file_problem(Path(self.rubric))):
            found["rubric"] = why
        return found

    def to_params(self) -> dict[str, Any]:
        return {"targets": list(self.targets), "data": self.data, "limit": self.limit,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "name": self.name,
                "judge": self.judge, "rubric": self.rubric}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> EvalRequest:
        """Any params dict an older version wrote; unknown keys are ignored, wrong types are left
        for `problems` to name."""
        return cls(targets=tuple(str(t) for t in params.get("targets") or ()),
                   data=str(params.get("data") or ""),
                   limit=params.get("limit", DEFAULT_LIMIT),
                   max_new_tokens=params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                   seed=params.get("seed", DEFAULT_SEED), name=params.get("name") or None,
                   judge=params.get("judge") or "", rubric=params.get("rubric") or "")


def _absolute(value: str | None) -> str:
    """An existing file or folder -> its absolute path; anything else as given ("" for None)."""
    path = Path(value).expanduser() if value else None
    return str(path.resolve()) if path is not None and path.exists() else value or ""
