"""The registry names each job function by module: every entry must load (a typo in a module
path would otherwise surface only when a job of that kind runs), and loading the registry must
not load any stage's code."""

from __future__ import annotations

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
    code = ("import sys, appliance.stages\n"
            "print([m for m in sys.modules if m.startswith('appliance.stages.')"
            " and not m.endswith(('.request', '.export')) and m != 'appliance.stages.export'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_misnamed_job_function_is_an_import_error_naming_it() -> None:
    with pytest.raises(ModuleNotFoundError, match="appliance.stages.nosuch"):
        stages.StageJob("appliance.stages.nosuch.job").load()
