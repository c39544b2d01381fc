"""Training config (recipes, validation, `--set` overrides) and the pure helpers of the training loop:
learning-rate schedule, length-grouped batching, collation. No model is loaded."""

from __future__ import annotations

import dataclasses
import json
import random
from importlib import resources
from itertools import pairwise
from pathlib import Path

import pytest

from appliance.errors import ValidationError
from appliance.stages.train import config as trainconfig
from appliance.stages.train.config import TrainConfig, load_recipe, parse_override, validate
from appliance.stages.train.recipe import Example, LoopState, collate, epoch_batches, lr_at

RECIPES = trainconfig.recipe_names()


# -- recipes -----------------------------------------------------------------------------------
def test_five_recipes_are_shipped() -> None:
    assert len(RECIPES) == 5
    assert "smollm2-cpu" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_loads_and_validates(name: str) -> None:
    values, source = load_recipe(name)
    assert values, f"{name} is empty"
    config = validate(values, source=source, context_length=8192)
    for key, value in values.items():
        assert getattr(config, key) == value
    first = (resources.files("appliance") / "recipes" / f"{name}.toml").read_text("utf-8").splitlines()[0]
    assert first.startswith("# appliance train"), first
    assert f"--recipe {name}" in first


def test_unknown_recipe_hint_lists_shipped_ones() -> None:
    with pytest.raises(ValidationError) as info:
        load_recipe("nope")
    assert "nope" in info.value.message
    assert info.value.hint is not None
    for name in RECIPES:
        assert name in info.value.hint


def test_recipe_from_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("# comment\nlora_r = 4\ntarget_modules = [\"q_proj\"]\n", encoding="utf-8")
    values, source = load_recipe(str(path))
    assert values == {"lora_r": 4, "target_modules": ["q_proj"]}
    assert source == str(path)


def test_broken_recipe_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("lora_r = = 4\n", encoding="utf-8")
    with pytest.raises(ValidationError, match="not valid TOML") as info:
        load_recipe(str(path))
    assert str(path) in info.value.message


# -- validation --------------------------------------------------------------------------------
def test_validate_reports_every_problem_at_once() -> None:
    bad = {"lora_rank": 8, "lora_r": 0, "lora_dropout": 1.5, "learning_rate": "fast",
           "quantization": "int3", "gradient_checkpointing": "yes", "max_steps": 2.5}
    with pytest.raises(ValidationError) as info:
        validate(bad, source="my.toml")
    msg = info.value.message
    assert msg.startswith("my.toml: 7 problem(s)")
    for key in bad:
        assert f"{key}:" in msg, key
    assert "[1, 1024]" in msg           # lora_r range
    assert "[0, 0.9]" in msg            # lora_dropout range
    assert "nf4, none" in msg           # quantization choices
    assert "true or false" in msg
    assert "lora_rank: unknown key (known: lora_r," in msg
    assert "max_steps: must be an integer" in msg
    assert "learning_rate: must be a number" in msg


def test_validate_valid_config_fills_defaults_and_coerces_ints() -> None:
    config = validate({"lora_r": 4.0, "learning_rate": 1e-3, "optimizer": "adamw",
                       "gradient_checkpointing": False, "target_modules": ["q_proj", "v_proj"]})
    assert config.lora_r == 4 and type(config.lora_r) is int
    assert config.learning_rate == 1e-3
    assert config.optimizer == "adamw"
    assert config.gradient_checkpointing is False
    assert config.target_modules == ["q_proj", "v_proj"]
    expected = dataclasses.replace(TrainConfig(), lora_r=4, learning_rate=1e-3, optimizer="adamw",
                                   gradient_checkpointing=False, target_modules=["q_proj", "v_proj"])
    assert config == expected
    assert validate({}) == TrainConfig()


@pytest.mark.parametrize("value", [True, [], [1], "q_proj"])
def test_validate_rejects_bad_target_modules(value: object) -> None:
    with pytest.raises(ValidationError, match="target_modules"):
        validate({"target_modules": value})


def test_max_seq_len_longer_than_context() -> None:
    with pytest.raises(ValidationError, match="1 problem") as info:
        validate({"max_seq_len": 4096}, context_length=2048)
    assert "max_seq_len" in info.value.message
    assert "4096" in info.value.message and "2048" in info.value.message
    assert validate({"max_seq_len": 2048}, context_length=2048).max_seq_len == 2048


def test_bad_max_seq_len_is_one_problem() -> None:
    with pytest.raises(ValidationError, match="1 problem"):
        validate({"max_seq_len": "long"}, context_length=512)


def test_seed_range_is_exact() -> None:
    with pytest.raises(ValidationError, match=r"\[0, 4294967295\]"):
        validate({"seed": -1})


# -- overrides ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("lora_r=8", ("lora_r", 8)),
    ('target_modules=["q_proj","v_proj"]', ("target_modules", ["q_proj", "v_proj"])),
    ("gradient_checkpointing=false", ("gradient_checkpointing", False)),
    ("learning_rate=1e-4", ("learning_rate", 1e-4)),
    ("optimizer=adamw", ("optimizer", "adamw")),
    (' quantization = "none"', ("quantization", "none")),
])
def test_parse_override(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["noequals", "=8", " =8"])
def test_parse_override_needs_key_and_equals(text: str) -> None:
    with pytest.raises(ValidationError, match="key=value"):
        parse_override(text)


def test_a_bad_override_names_the_flag_it_came_with() -> None:
    """The CLI's flag, or none (the TUI's form names its field): not always `--set`."""
    with pytest.raises(ValidationError, match=r"^--threshold 'garbage': expected key=value$"):
        parse_override("garbage", "--threshold")
    with pytest.raises(ValidationError, match=r"^'garbage': expected key=value$"):
        parse_override("garbage")


# -- learning-rate schedule --------------------------------------------------------------------
def test_lr_warmup_then_cosine() -> None:
    cfg = TrainConfig(warmup_steps=4, max_steps=20, learning_rate=1e-3)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[0] == pytest.approx(2.5e-4)
    assert lrs[3] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(5e-4)
    assert 0 < lrs[19] < 2e-5
    assert lrs[:4] == sorted(lrs[:4])
    assert all(a >= b for a, b in pairwise(lrs[3:]))


def test_lr_without_warmup() -> None:
    cfg = TrainConfig(warmup_steps=0, max_steps=10, learning_rate=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(0.0, abs=1e-12)


# -- batching ----------------------------------------------------------------------------------
def _spread(batches: list[list[int]], lengths: list[int]) -> float:
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_epoch_batches() -> None:
    lengths = [random.Random(i).randint(1, 2000) for i in range(100)]
    batches = epoch_batches(lengths, 4, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert all(len(b) == 4 for b in batches)
    assert epoch_batches(lengths, 4, seed=3, epoch=0) == batches
    assert epoch_batches(lengths, 4, seed=3, epoch=1) != batches
    assert epoch_batches(lengths, 4, seed=4, epoch=0) != batches
    order = list(range(100))
    random.Random(0).shuffle(order)
    naive = [order[k:k + 4] for k in range(0, 100, 4)]
    assert _spread(batches, lengths) * 5 < _spread(naive, lengths)


def test_epoch_batches_short_batch() -> None:
    batches = epoch_batches([5, 1, 9, 3, 7, 2, 8, 4, 6, 10], 4, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [2, 4, 4]
    assert sorted(i for b in batches for i in b) == list(range(10))


# -- collation and loop state ------------------------------------------------------------------
def test_collate_pads_right() -> None:
    batch = collate([Example([1, 2, 3], [-100, 2, 3]), Example([4], [4]), Example([5, 6], [-100, 6])],
                    pad_id=0)
    assert batch["input_ids"].shape == (3, 3)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100], [-100, 6, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert collate([Example([7, 8], [7, 8]), Example([9], [9])], pad_id=99)["input_ids"].tolist() \
        == [[7, 8], [9, 99]]


def test_loop_state_round_trips_through_json() -> None:
    state = LoopState(step=7, epoch=1, batch_index=3, best_eval=1.25, first_eval=2.0, last_eval=1.5)
    assert LoopState(**json.loads(json.dumps(state.__dict__))) == state
    assert LoopState() == LoopState(0, 0, 0, None, 0, None, None)


def test_a_checkpoint_without_its_complete_marker_is_never_loaded(tmp_path: Path) -> None:
    from appliance.stages.train import recipe as train

    for step, complete in ((2, True), (4, True), (6, False)):  # step 6: killed mid-write
        folder = tmp_path / "checkpoints" / f"step-{step:07d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / train.COMPLETE).touch()
    latest = train.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-0000004"
