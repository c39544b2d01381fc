"""systemd units for the server and for detached jobs (filled in by the runtime issue)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add `appliance systemd ...` to the `appliance` parser."""
