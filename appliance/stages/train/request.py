"""What a training job is asked to do, with its defaults defined once.

The CLI's `train`, the TUI's Train form and the demo build a `TrainRequest`: a model, a dataset,
the recipe's values with the operator's overrides (`config`, validated by `train.config`), where
they came from (`source`, recorded with the run) and the run's name. `problems()` is checked
before the job is queued (`appliance.api`) and names each bad recipe key as its field
(`learning_rate`, ...), so a front end can show it there. `to_params()` / `from_params()` are the
job row's JSON (unknown keys of older rows are ignored). Only the standard library and the core
at module scope (`train.config` is a dataclass and TOML): the TUI imports it on every keystroke.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from appliance.errors import InvalidRequest, ValidationError
from appliance.stages.train import config as trainconfig
from appliance.workspace import check_name

DEFAULT_RECIPE = "smollm2-cpu"
DEFAULT_SOURCE = "config"  # `source` of a job row that has none (what the job assumes)
REQUEST_FIELDS = ("model", "dataset", "config", "source", "name", "recipe")  # not recipe keys


def default_run_name(model: str, dataset: str) -> str:
    """The run's name when none is given."""
    return f"{model}-{dataset}"


@dataclass(frozen=True)
class TrainRequest:
    """Train `model` on `dataset` with `config` (recipe key -> value, not yet validated)."""

    model: str
    dataset: str
    config: Mapping[str, Any] = field(default_factory=dict)
    source: str = DEFAULT_SOURCE
    name: str = ""

    kind: ClassVar[str] = "train"

    @classmethod
    def from_recipe(cls, model: str, dataset: str, recipe: str = DEFAULT_RECIPE,
                    overrides: Mapping[str, Any] | None = None, name: str | None = None) -> TrainRequest:
        """A shipped recipe (or a .toml file) with overrides on top; the name defaults to
        MODEL-DATASET. A recipe that cannot be read is refused naming the field `recipe`."""
        try:
            values, source = trainconfig.load_recipe(recipe)
        except ValidationError as exc:
            message = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
            raise InvalidRequest("the train request is not valid", {"recipe": message}) from None
        return cls(model, dataset, {**values, **(overrides or {})}, source,
                   name or default_run_name(model, dataset))

    def problems(self, *, context_length: int | None = None) -> dict[str, str]:
        """Field -> what is wrong with it; empty when the request can be queued. A recipe key's
        problem is named by the key (`learning_rate`); `context_length` (the model's, when the
        caller knows it) also bounds `max_seq_len`."""
        found: dict[str, str] = {}
        for name in ("model", "dataset"):
            if not getattr(self, name):
                found[name] = f"pick a {name}"
        if not self.name:
            found["name"] = "give the run a name"
        else:
            try:
                check_name(self.name, "run name")
            except ValidationError as exc:
                found["name"] = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        if not isinstance(self.config, Mapping):
            found["config"] = f"expected recipe key -> value, got {self.config!r}"
            return found
        for key, problem in config_problems(self.config, context_length).items():
            found[f"config.{key}" if key in REQUEST_FIELDS else key] = problem  # an unknown key
        return found

    def train_config(self, *, context_length: int | None = None) -> trainconfig.TrainConfig:
        """The validated config; `InvalidRequest` naming each bad key otherwise."""
        found = config_problems(self.config, context_length)
        if found:
            raise InvalidRequest("the training config is not valid", found)
        return trainconfig.validate(dict(self.config), source=self.source,
                                    context_length=context_length)

    def to_params(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "config": dict(self.config),
                "source": self.source, "name": self.name}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainRequest:
        config = params.get("config")
        return cls(model=str(params.get("model") or ""), dataset=str(params.get("dataset") or ""),
                   config=dict(config) if isinstance(config, Mapping) else config or {},
                   source=str(params.get("source") or DEFAULT_SOURCE),
                   name=str(params.get("name") or ""))


def config_problems(values: Mapping[str, Any], context_length: int | None = None) -> dict[str, str]:
    """Recipe key -> what is wrong with its value (an unknown key included), by `train.config`'s
    rules: each key is validated on its own, so the key a problem belongs to is known, not read
    from text; the message is `validate`'s line for it without the `key: ` it starts with."""
    values = dict(values)
    try:
        trainconfig.validate(values, context_length=context_length)
        return {}
    except ValidationError:
        pass
    found: dict[str, str] = {}
    keys = list(values) if "max_seq_len" in values else [*values, "max_seq_len"]
    for key in keys:
        one = {key: values[key]} if key in values else {}  # max_seq_len absent: its default
        try:
            trainconfig.validate(one, source=key, context_length=context_length)
        except ValidationError as exc:
            lines = [line.strip() for line in exc.message.splitlines()[1:]] or [exc.message]
            found[key] = "; ".join(line.removeprefix(f"{key}: ") for line in lines)
    return found
