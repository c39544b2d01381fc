"""The training form's logic, apart from its widgets: choices, validation as you type, the planner's
verdict, and the job parameters (the same the CLI's `appliance train` queues).

`check` is pure and fast (a recipe's values, the fields' overrides, the `TrainRequest`'s problems,
each named by its field, and `planner.plan` on the model's shape), so the form runs it on every
keystroke; everything it needs from disk is read once, in a worker, by `load_choices`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance import api, jobs
from appliance.errors import ApplianceError, ValidationError
from appliance.gpus import GpuStatus
from appliance.stages.train import config as trainconfig
from appliance.stages.train import planner, runs
from appliance.stages.train.request import DEFAULT_RECIPE, REQUEST_FIELDS, TrainRequest, default_run_name
from appliance.workspace import Workspace, check_name

FORM_KEYS = ("max_steps", "learning_rate", "lora_r", "lora_alpha", "batch_size", "grad_accum",
             "max_seq_len", "warmup_steps", "eval_every", "save_every")
HERE = "here"  # the target value meaning "the GPU of this machine, if any"


@dataclass(frozen=True)
class ModelChoice:
    name: str
    context_length: int | None
    shape: planner.Shape | None


@dataclass(frozen=True)
class TrainChoices:
    models: list[ModelChoice] = field(default_factory=list)
    datasets: dict[str, str] = field(default_factory=dict)        # dataset -> its model
    recipes: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    runs: frozenset[str] = frozenset()
    busy_names: frozenset[str] = frozenset()                     # runs that active jobs will publish
    gpus: tuple[GpuStatus, ...] = ()

    def model(self, name: str | None) -> ModelChoice | None:
        return next((m for m in self.models if m.name == name), None)


def _shape(path: Any) -> planner.Shape | None:
    try:
        return planner.Shape.from_config(json.loads((path / "config.json").read_text("utf-8")))
    except (OSError, ValueError, ApplianceError):
        return None


def load_choices(ws: Workspace, gpus: tuple[GpuStatus, ...]) -> TrainChoices:
    """Everything the form offers, read once (call from a worker)."""
    recipes = {name: trainconfig.load_recipe(name) for name in trainconfig.recipe_names()}
    if not ws.exists():
        return TrainChoices(recipes=recipes, gpus=gpus)
    models = [ModelChoice(r.name, r.summary.get("context_length"), _shape(r.path))
              for r in ws.list("model")]
    return TrainChoices(models, {r.name: r.summary.get("model", "") for r in ws.list("dataset")},
                        recipes, frozenset(r.name for r in ws.list("run")), runs.busy_names(ws), gpus)


@dataclass
class FormState:
    model: str | None = None
    dataset: str | None = None
    recipe: str = DEFAULT_RECIPE
    target: str = HERE
    name: str = ""
    fields: dict[str, str] = field(default_factory=dict)  # FORM_KEYS -> text typed
    extras: str = ""                                       # "key=value; key=value"
    force: bool = False


@dataclass
class Checked:
    values: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    name: str = ""
    problems: dict[str, str] = field(default_factory=dict)  # field -> what is wrong with it
    plan: str = ""
    fits: bool | None = None  # None: nothing to plan for (CPU, or the config is invalid)

    @property
    def ok(self) -> bool:
        return not self.problems


def field_text(value: Any) -> str:
    """How a recipe value appears in a field (TOML, so `parse_override` reads it back)."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str | list) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def _overrides(form: FormState, problems: dict[str, str]) -> dict[str, Any]:
    values = {}
    for key, text in form.fields.items():
        if text.strip():
            values[key] = trainconfig.parse_override(f"{key}={text.strip()}")[1]
    for item in filter(str.strip, form.extras.replace("\n", ";").split(";")):
        try:
            key, value = trainconfig.parse_override(item.strip())
        except ValidationError as exc:
            problems["extras"] = exc.message
            continue
        values[key] = value
    return values


def form_field(key: str) -> str:
    """The form field a request field's problem is shown at: a recipe key without a field of its
    own is typed in "more" (`extras`)."""
    return key if key in FORM_KEYS or key in ("name", "recipe") else "extras"


def add_problems(out: Checked, found: dict[str, str]) -> None:
    """A request's problems (field -> why) at the form's fields."""
    for key, why in found.items():
        target = form_field(key)
        text = why if target == key else f"{key}: {why}"
        out.problems[target] = "; ".join(filter(None, (out.problems.get(target), text)))


def target_spec(target: str, gpus: tuple[GpuStatus, ...]) -> planner.GpuSpec | None:
    if target != HERE:
        return planner.target_named(target)
    return planner.spec_for(gpus[0]) if gpus else None


def _selection_problems(form: FormState, choices: TrainChoices, out: Checked) -> None:
    if choices.model(form.model) is None:
        out.problems["model"] = "pick a model (2 Models imports one)"
    if form.dataset not in choices.datasets:
        out.problems["dataset"] = f"pick a dataset made for {form.model or 'the model'} " \
                                  "(3 Datasets imports one)"
    if form.recipe not in choices.recipes:
        out.problems["recipe"] = "pick a recipe"
    # no made-up name ("None-None") before a model and a dataset are chosen: they are the problem
    out.name = form.name.strip() or (default_run_name(form.model, form.dataset)
                                      if form.model and form.dataset else "")
    if not out.name:
        return
    try:
        check_name(out.name, "run name")
    except ValidationError as exc:
        out.problems["name"] = exc.message
        return
    if out.name in choices.runs:
        out.problems["name"] = f"run {out.name!r} already exists: pick another name"
    elif out.name in choices.busy_names:
        out.problems["name"] = f"a training job will publish {out.name!r}: pick another name"


def _plan(form: FormState, choices: TrainChoices, cfg: trainconfig.TrainConfig, out: Checked) -> None:
    model = choices.model(form.model)
    spec = target_spec(form.target, choices.gpus)
    if spec is None:
        out.plan = "no GPU here: training runs on the CPU (small models only). Pick a target " \
                   "GPU to plan a run for it."
        return
    if model is None or model.shape is None:
        out.plan = "the model's shape is unknown: no memory plan"
        return
    plan = planner.plan(model.shape, cfg, spec)
    out.plan, out.fits = plan.describe(cfg), plan.fits
    if not plan.fits and not form.force:
        out.problems["plan"] = "the plan says it does not fit: apply the proposal, or tick " \
                               "'start anyway'"


def check(form: FormState, choices: TrainChoices) -> Checked:
    """Every problem of the form at once, and the planner's verdict when the config is valid."""
    out = Checked()
    _selection_problems(form, choices, out)
    if form.recipe not in choices.recipes:
        return out
    values, out.source = choices.recipes[form.recipe]
    out.values = {**values, **_overrides(form, out.problems)}
    model = choices.model(form.model)
    context = model.context_length if model else None
    # model, dataset and name are checked above against the workspace, with what to do about them
    found = {k: v for k, v in request(form, out).problems(context_length=context).items()
             if k not in REQUEST_FIELDS or k == "config"}
    if found:
        add_problems(out, found)
        return out
    _plan(form, choices, request(form, out).train_config(context_length=context), out)
    return out


def request(form: FormState, checked: Checked) -> TrainRequest:
    """The `train` job the form asks for (the one `appliance train` queues)."""
    return TrainRequest(form.model or "", form.dataset or "", checked.values, checked.source,
                        checked.name)


def start(ws: Workspace, form: FormState, checked: Checked) -> jobs.Job:
    """Queue the training job (checked again against the workspace: the CLI may have raced us)."""
    if not checked.ok:
        raise ValidationError("\n".join(f"{k}: {v}" for k, v in checked.problems.items()),
                              title="The form has problems")
    runs.check_new_run(ws, checked.name, rename="pick another name", jobs_at=" (5 Jobs)")
    return api.start_request(ws, request(form, checked))
