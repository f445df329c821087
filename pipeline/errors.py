"""Errors classified by type, never by message text.

Every localflow error carries ``retriable``: the task supervisor restarts a task after a
retriable error (with backoff) and reports a non-retriable one as a configuration or
implementation problem that a restart would not fix.
"""

from __future__ import annotations

from typing import ClassVar


def describe(e: BaseException) -> str:
    """Type and text of an error, for messages (timeouts often have no text)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class LocalflowError(Exception):
    """Base of every error localflow raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(LocalflowError):
    """The catalog or a connector configuration is wrong; fix the file, then retry.

    ``problems`` holds ``(place, message)`` pairs such as
    ``("captures.sophia/metrics.interval", "'30x' is not a duration")``.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, place: str = "") -> None:
        if isinstance(problems, str):
            problems = [(place, problems)]
        self.problems = problems
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in problems))


class EndpointError(LocalflowError):
    """An endpoint (broker, database, cache, bucket, source) failed; usually transient."""

    retriable = True


class SourceError(EndpointError):
    """A capture's source answered badly (connection error, 5xx, timeout)."""


class Fenced(LocalflowError):
    """Another worker took over a partition this worker was writing; its batch must be dropped."""

    retriable = True


class Backpressure(LocalflowError):
    """The endpoint asks us to slow down; retry the same batch later."""

    retriable = True


class ValidationFailed(LocalflowError):
    """A document does not match its collection's schema (becomes a dead letter)."""


class CheckpointError(LocalflowError):
    """A stored checkpoint is unreadable or from an unknown version; never silently reset."""


class ImplementationError(LocalflowError):
    """A connector broke its contract (e.g. a cursor that went backwards)."""
