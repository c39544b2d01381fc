"""Errors an operator can act on.

Every failure the appliance reports on purpose is an `ApplianceError` with a short title and a
message that says what went wrong, where (file, line, field) and what to do. The CLI prints these
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """A failure with a title and an actionable message."""

    title = "Error"

    def __init__(self, message: str, *, title: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class NotFoundError(ApplianceError):
    title = "Not found"


class ValidationError(ApplianceError):
    title = "Invalid input"


class RefusedError(ApplianceError):
    """Input that is well-formed but that the appliance will not accept (unsafe, unsupported)."""

    title = "Refused"


class IntegrityError(ApplianceError):
    """An artifact's files no longer match its manifest."""

    title = "Integrity check failed"


class BusyError(ApplianceError):
    """Another process is writing the same artifact."""

    title = "Busy"
