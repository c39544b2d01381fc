"""The registry names each job function by module: every entry must load (a typo in a module
path would otherwise surface only when a job of that kind runs), and loading the registry must
not load any stage's code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance import stages


@pytest.mark.parametrize("kind", sorted(stages.KINDS))
def test_every_job_kind_loads_its_function(kind: str) -> None:
    entry = stages.KINDS[kind]
    assert isinstance(entry, stages.StageJob)
    assert callable(entry.load())


def test_loading_the_registry_loads_no_stage_code() -> None:
    """Only the stages' packages, their typed requests and what those check against (a recipe's
    fields, the judge's rubric placeholders) load with the registry: no job function, no stage
    code, no ML library."""
    code = ("import json, sys, appliance.stages\n"
            "print(json.dumps([sorted(m for m in sys.modules if m.startswith('appliance.stages.')),\n"
            "                  [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, heavy = json.loads(out.stdout)
    code_modules = [m for m in loaded if m.count(".") > 2  # below a stage's package
                    and not m.endswith(".request")
                    and m not in ("appliance.stages.train.config", "appliance.stages.eval.rubric")]
    assert code_modules == [] and heavy == []
    assert "appliance.stages.export.request" in loaded  # the check sees what loads


def test_a_misnamed_job_function_is_an_import_error_naming_it() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"appliance\.stages\.nosuch"):
        stages.StageJob("appliance.stages.nosuch.job").load()
