"""On the edge profile a command that needs training says so in one line (exit 5), never with a
traceback; a module missing for another reason keeps its traceback (a broken install)."""

from __future__ import annotations

import argparse

import pytest

from appliance import cli


def _failing(name: str) -> argparse.Namespace:
    def func(_: argparse.Namespace) -> int:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return argparse.Namespace(func=func, json=False)


def test_a_full_profile_module_missing_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run_command(_failing("torch")) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs torch" in err and "full profile" in err


def test_any_other_missing_module_is_a_real_error() -> None:
    with pytest.raises(ModuleNotFoundError):
        cli.run_command(_failing("llama_cpp"))
