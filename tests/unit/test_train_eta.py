"""The training ETA counts the evaluations still due, the final one included (`evals_from`), so
the last step does not promise 'ETA 0' while a long final evaluation follows it."""

from __future__ import annotations

import pytest

from appliance.stages.train.config import validate
from appliance.stages.train.recipe import evals_from


@pytest.mark.parametrize(("max_steps", "eval_every"), [(6, 3), (4, 3), (5, 1), (7, 10), (100, 7)])
def test_evaluations_due_from_each_step(max_steps: int, eval_every: int) -> None:
    cfg = validate({"max_steps": max_steps, "eval_every": eval_every})
    for step in range(1, max_steps + 1):
        due = [s for s in range(step, max_steps + 1) if s % eval_every == 0 or s == max_steps]
        assert evals_from(step, cfg) == len(due), step
    assert evals_from(max_steps, cfg) == 1  # the final evaluation
    assert evals_from(max_steps + 1, cfg) == 0
