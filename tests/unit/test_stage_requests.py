"""The typed requests of the import-model, train, merge and verify stages: defaults and choices
defined once, problems named by field, params as written today still loading (old job rows
resume), and the door refusing a bad request before anything is queued."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from appliance import api, jobs, stages
from appliance.errors import InvalidRequest
from appliance.stages.datasets.request import FORMATS, FORMS, ImportDatasetRequest
from appliance.stages.merge.request import BASES, DTYPES, MergeRequest
from appliance.stages.models.request import ImportModelRequest
from appliance.stages.train import config as trainconfig
from appliance.stages.train.request import DEFAULT_RECIPE, TrainRequest, config_problems
from appliance.stages.verify.request import THRESHOLD_KEYS, VerifyRequest
from appliance.workspace import Workspace

RECIPE_VALUES, RECIPE_SOURCE = trainconfig.load_recipe(DEFAULT_RECIPE)


def test_every_job_kind_that_takes_params_has_a_typed_request() -> None:
    assert set(stages.REQUESTS) == set(stages.KINDS) - {"selftest", "serve"}
    for kind, request in stages.REQUESTS.items():
        assert request.kind == kind  # type: ignore[attr-defined]


def test_the_choices_are_the_ones_the_stages_use() -> None:
    from appliance.stages.merge import weights
    from appliance.stages.verify import parity

    assert (DTYPES, BASES) == (weights.DTYPES, weights.BASES)  # the merge imports the one copy
    assert set(THRESHOLD_KEYS) == {f.name for f in dataclasses.fields(parity.Threshold)}
    assert DEFAULT_RECIPE in trainconfig.recipe_names()


# -- round trips, and params as the code writes them today -------------------------------------
def test_requests_round_trip_through_params(tmp_path: Path) -> None:
    for request in (
            ImportModelRequest.for_path(tmp_path, "my-model"),
            ImportModelRequest(default=True),
            TrainRequest("m", "d", {"learning_rate": 1e-4, "max_steps": 5}, "recipe.toml", "run"),
            MergeRequest("r", "fp16", "nf4"),
            MergeRequest("r", None, None),
            VerifyRequest("r-gguf-q8_0", {"kl": 0.5})):
        assert type(request).from_params(request.to_params()) == request, request


@pytest.mark.parametrize(("kind", "params", "expected"), [
    # cli.cmd_models_import --detach, tui/screens/models.start_import (path and default)
    ("import-model", {"default": False, "path": "/m/hf", "name": None, "chat_template": "/m/t.jinja"},
     ImportModelRequest("/m/hf", None, "/m/t.jinja")),
    ("import-model", {"default": True, "path": None, "name": None, "chat_template": None},
     ImportModelRequest(default=True)),
    # cli.train_params, tui.trainform.start, demo._train
    ("train", {"model": "m", "dataset": "d", "config": {"max_steps": 3}, "source": "/r.toml",
               "name": "m-d"}, TrainRequest("m", "d", {"max_steps": 3}, "/r.toml", "m-d")),
    ("train", {"model": "m", "dataset": "d", "config": {}, "name": "n"},  # no source: the default
     TrainRequest("m", "d", {}, "config", "n")),
    # cli.cmd_merge, the TUI's merge dialog
    ("merge", {"run": "r", "dtype": "auto", "base": "full"}, MergeRequest("r")),
    ("merge", {"run": "r"}, MergeRequest("r", None, None)),
    # cli.cmd_verify, the TUI's `v`
    ("verify", {"export": "e", "overrides": {"kl": 1}}, VerifyRequest("e", {"kl": 1.0})),
    ("verify", {"export": "e", "overrides": None}, VerifyRequest("e")),
])
def test_params_written_today_load_and_unknown_keys_are_ignored(
        kind: str, params: dict[str, Any], expected: Any) -> None:
    loaded = stages.REQUESTS[kind].from_params({**params, "gone": 1, "from_the_future": [2]})
    assert loaded == expected
    assert "gone" not in loaded.to_params()


def test_to_params_writes_the_keys_the_jobs_read() -> None:
    assert set(ImportModelRequest(default=True).to_params()) == {"default", "path", "name",
                                                                 "chat_template"}
    assert set(TrainRequest("m", "d").to_params()) == {"model", "dataset", "config", "source", "name"}
    assert MergeRequest("r").to_params() == {"run": "r", "dtype": "auto", "base": "full"}
    assert VerifyRequest("e").to_params() == {"export": "e", "overrides": {}}


# -- problems, each named by its field ----------------------------------------------------------
@pytest.mark.parametrize(("request_", "field", "words"), [
    (ImportModelRequest(), "path", "give a path"),
    (ImportModelRequest("/x", default=True), "path", "not both"),
    (ImportModelRequest("/no/such/folder"), "path", "does not exist"),
    (MergeRequest("r", "int8"), "dtype", "unknown dtype 'int8'"),
    (MergeRequest("r", base="q4"), "base", "unknown base 'q4'"),
    (MergeRequest(""), "run", "finished run"),
    (VerifyRequest("e", {"klx": 1.0}), "overrides", "unknown threshold 'klx'"),
    (VerifyRequest("e", {"agreement": 1.5}), "overrides", "between 0 and 1"),
    (VerifyRequest(""), "export", "pick an export"),
    (TrainRequest("m", "d", {"learning_rate": 5.0}, name="r"), "learning_rate", "out of range"),
    (TrainRequest("m", "d", {"max_steps": "abc"}, name="r"), "max_steps",
     "must be an integer, got 'abc'"),
    (TrainRequest("m", "d", {"optimizer": "sgd"}, name="r"), "optimizer", "must be one of"),
    (TrainRequest("m", "d", {"colour": 3}, name="r"), "colour", "unknown key"),
    (TrainRequest("m", "d", {}, name="no spaces"), "name", "invalid run name"),
    (TrainRequest("", "d", {}, name="r"), "model", "pick a model"),
])
def test_each_problem_is_named_by_its_field(request_: Any, field: str, words: str) -> None:
    found = request_.problems()
    assert list(found) == [field] and words in found[field], found


def test_a_bad_model_name_and_a_missing_template_are_named(tmp_path: Path) -> None:
    found = ImportModelRequest.for_path(tmp_path, "bad name", tmp_path / "none.jinja").problems()
    assert set(found) == {"name", "chat_template"}
    assert "invalid model name 'bad name'" in found["name"]


def test_train_problems_name_every_bad_key_without_the_key_in_the_message() -> None:
    values = {**RECIPE_VALUES, "max_steps": "abc", "lora_r": 0, "learning_rate": 2.0}
    found = TrainRequest("m", "d", values, RECIPE_SOURCE, "r").problems()
    assert found == {"max_steps": "must be an integer, got 'abc'",
                     "lora_r": "0 is out of range [1, 1024]",
                     "learning_rate": "2.0 is out of range [1e-07, 1]"}


def test_max_seq_len_is_bounded_by_the_model_context_when_it_is_known() -> None:
    request = TrainRequest("m", "d", {"max_seq_len": 9000}, name="r")
    assert request.problems() == {}
    assert "longer than the model's context (8192)" in \
        request.problems(context_length=8192)["max_seq_len"]
    # no max_seq_len given: the default (1024) is what must fit
    assert list(config_problems({}, context_length=512)) == ["max_seq_len"]


def test_train_config_is_the_validated_config_or_a_refusal_by_field() -> None:
    cfg = TrainRequest("m", "d", {"max_steps": 7.0}, name="r").train_config()
    assert cfg.max_steps == 7 and isinstance(cfg.max_steps, int)
    with pytest.raises(InvalidRequest) as err:
        TrainRequest("m", "d", {"weight_decay": -1}, name="r").train_config()
    assert list(err.value.problems) == ["weight_decay"]


def test_from_recipe_reads_the_recipe_and_names_the_run() -> None:
    request = TrainRequest.from_recipe("m", "d", overrides={"max_steps": 2})
    assert request.config == {**RECIPE_VALUES, "max_steps": 2}
    assert request.source == RECIPE_SOURCE and request.name == "m-d"
    assert TrainRequest.from_recipe("m", "d", name="mine").name == "mine"
    with pytest.raises(InvalidRequest) as err:
        TrainRequest.from_recipe("m", "d", "no-such-recipe")
    assert list(err.value.problems) == ["recipe"] and "no recipe" in err.value.problems["recipe"]


# -- the door ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "params", "field"), [
    ("import-model", {"default": False, "path": "/no/such/model", "name": None,
                      "chat_template": None}, "path"),
    ("train", {"model": "m", "dataset": "d", "config": {**RECIPE_VALUES, "learning_rate": "fast"},
               "source": RECIPE_SOURCE, "name": "m-d"}, "learning_rate"),
    ("merge", {"run": "r", "dtype": "fp8", "base": "full"}, "dtype"),
    ("verify", {"export": "e", "overrides": {"kl": "small"}}, "overrides"),
    ("verify", {"export": "e", "overrides": {"kll": 0.1}}, "overrides"),
])
def test_the_door_refuses_a_bad_request_naming_the_field_and_queues_nothing(
        workspace: Workspace, kind: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        api.check(kind, params)
    assert list(err.value.problems) == [field], err.value.problems
    assert f"{field}:" in err.value.message
    with pytest.raises(InvalidRequest):
        api.start(workspace, kind, params)
    assert jobs.list_jobs(workspace) == []


def test_start_request_queues_the_typed_request(workspace: Workspace,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "spawn", lambda ws, job_id: 0)
    job = api.start_request(workspace, MergeRequest("r", "bf16"))
    assert (job.kind, job.params) == ("merge", {"run": "r", "dtype": "bf16", "base": "full"})
    with pytest.raises(InvalidRequest) as err:
        api.start_request(workspace, TrainRequest("m", "d", {"seed": -1}, name="r"))
    assert list(err.value.problems) == ["seed"]
    assert [j.kind for j in jobs.list_jobs(workspace)] == ["merge"]


def test_an_unknown_recipe_key_named_like_a_request_field_is_not_taken_for_it() -> None:
    found = TrainRequest("m", "d", {"name": 3}, name="r").problems()
    assert list(found) == ["config.name"] and "unknown key" in found["config.name"]


def test_the_dataset_request_names_each_bad_field(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    good = ImportDatasetRequest.for_path(str(data), "m")
    assert good.problems() == {} and good.path == str(data.resolve())
    assert ImportDatasetRequest.from_params(good.to_params()) == good
    assert ImportDatasetRequest.from_params({"path": str(data), "model": "m", "old": 1}) == good
    bad = ImportDatasetRequest(str(tmp_path), "", name="a/b", form="csv", eval_fraction=1.0,
                               max_tokens=0)
    found = bad.problems()
    assert set(found) == {"path", "model", "name", "form", "eval_fraction", "max_tokens"}
    assert "is not a file" in found["path"] and "one of auto, messages" in found["form"]
    assert "does not exist" in ImportDatasetRequest(str(tmp_path / "x"), "m").problems()["path"]
    assert ImportDatasetRequest.for_path(" ", "m").problems()["path"] == "give a JSONL file"
    assert ImportDatasetRequest(str(data), "m", eval_fraction=float("nan")).problems()


def test_the_dataset_import_refuses_before_reading(tmp_path: Path) -> None:
    from appliance.errors import NotFoundError
    from appliance.stages.datasets import importer

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(NotFoundError, match="no model named 'm'"):
        importer.run(ws, ImportDatasetRequest(str(tmp_path / "x.jsonl"), "m"))
    assert importer.FORMS == FORMS and set(FORMATS) == {"auto", *importer.FORMS}
