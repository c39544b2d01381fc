"""Fixtures of the TUI tests; the helpers themselves are in tuikit.py."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: trains for real on the CPU (about a minute on 2 cores)")
