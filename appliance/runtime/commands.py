"""CLI commands of the runtime: `chat`, `serve` and `keys` (filled in by the runtime issue)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the runtime's subcommands to the `appliance` parser."""
