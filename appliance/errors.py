"""Errors an operator can act on.

Every failure the appliance reports on purpose is an `ApplianceError` with a short title and a
message that says what went wrong, where (file, line, field) and what to do. The CLI prints these
without a traceback; anything else is a bug and keeps its traceback.

Each class carries the exit code the CLI ends with, so a script can tell the failures apart
(`ExitCode`, documented in the README) without parsing messages.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `appliance ...` exits with. Stable: scripts depend on these numbers."""

    OK = 0
    FAILED = 1  # a check said no (doctor, plan), or an unexpected error (with a traceback)
    USAGE = 2  # wrong arguments (argparse's own code)
    NETWORK_BLOCKED = 3  # code tried to reach the network
    NOT_FOUND = 4  # no such model, dataset, run, export, job, key, file
    INVALID = 5  # input refused: malformed, unsafe, unsupported, fails its manifest
    PARITY_FAILED = 6  # an export was made but failed its parity gate
    JOB_FAILED = 7  # a job that was followed ended failed, cancelled or interrupted
    BUSY = 8  # another process holds the artifact or the port
    DISK_FULL = 9  # no space left where the appliance had to write
    INTERRUPTED = 130  # Ctrl-C


class ApplianceError(Exception):
    """A failure with a title and an actionable message."""

    title = "Error"
    exit_code: ExitCode = ExitCode.FAILED

    def __init__(self, message: str, *, title: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message


class UsageError(ApplianceError):
    """The command line itself is wrong (a missing or conflicting argument)."""

    title = "Usage"
    exit_code = ExitCode.USAGE


class NotFoundError(ApplianceError):
    title = "Not found"
    exit_code = ExitCode.NOT_FOUND


class ValidationError(ApplianceError):
    title = "Invalid input"
    exit_code = ExitCode.INVALID


class InvalidRequest(ValidationError):
    """A job request with fields that are wrong (`problems`: field -> what is wrong), refused
    before it is queued: a front end can show each message at its field."""

    def __init__(self, what: str, problems: dict[str, str]) -> None:
        listed = "; ".join(f"{name}: {message}" for name, message in problems.items())
        super().__init__(f"{what}: {listed}", hint="fix the fields named and try again")
        self.problems = problems


class RefusedError(ApplianceError):
    """Input that is well-formed but that the appliance will not accept (unsafe, unsupported)."""

    title = "Refused"
    exit_code = ExitCode.INVALID


class IntegrityError(ApplianceError):
    """An artifact's files no longer match its manifest."""

    title = "Integrity check failed"
    exit_code = ExitCode.INVALID


class BusyError(ApplianceError):
    """Another process is writing the same artifact."""

    title = "Busy"
    exit_code = ExitCode.BUSY


class DiskFullError(ApplianceError):
    """No space left where the appliance had to write: says where, and how much is free."""

    title = "Disk full"
    exit_code = ExitCode.DISK_FULL


class JobFailedError(ApplianceError):
    """A job that was followed to its end did not succeed (failed, cancelled or interrupted)."""

    title = "Job did not finish"
    exit_code = ExitCode.JOB_FAILED


class AlreadyExistsError(ValidationError):
    """The name asked for is taken (an artifact, a run, a key)."""

    title = "Already exists"
