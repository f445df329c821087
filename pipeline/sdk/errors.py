"""Errors classified by type, never by message text.

Every localflow error carries ``retriable``: the task supervisor restarts a task after a
retriable error (with backoff) and reports a non-retriable one as a configuration or
implementation problem that a restart would not fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

MASK = "***"
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/:@]*):(?P<pw>[^\s/@]+)@")


def describe(e: BaseException) -> str:
    """Type and text of an error, for messages (timeouts often have no text)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` without the given secret values (longest first, so none leaves a tail behind) and
    without URL credentials: for connectors quoting a driver's error, which may hold a DSN."""
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            text = text.replace(s, MASK)
    if "://" in text:
        text = URL_CREDENTIALS.sub(rf"\g<scheme>\g<user>:{MASK}@", text)
    return text


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


class Unrecoverable(LocalflowError):
    """A restart would repeat the failure or make it worse: the supervisor stops the task instead
    (reported in ``/readyz``, ``localflow status`` and ``localflow_task_up``) until an operator acts."""


class OffsetGap(Unrecoverable):
    """A stored offset the broker no longer has: below the partition's log start (retention deleted
    records) or beyond its end (the topic was deleted and recreated).

    Reading on from the nearest offset would commit past records this endpoint never applied, so
    the task stops. ``localflow replay`` re-reads what the collection still holds into the endpoint
    and moves its stored offsets back into the partition's range.
    """

    def __init__(self, task: str, topic: str, partition: int, offset: int, begin: int | None, end: int | None) -> None:
        self.topic, self.partition, self.offset, self.begin, self.end = topic, partition, offset, begin, end
        where = "below the log start" if begin is not None and offset < begin else "beyond the end"
        span = f"[{begin if begin is not None else '?'}, {end if end is not None else '?'})"
        why = ("records were deleted by retention before this task read them" if where == "below the log start"
               else "the topic was deleted and recreated (or the stored offset belongs to another cluster)")
        super().__init__(
            f"{task}: stored offset {offset} of {topic}[{partition}] is {where} of the partition, which holds "
            f"offsets {span}: {why}. Stopped without committing past the gap; run `localflow replay` "
            f"for this materialization (--from-beginning re-reads what the topic holds) to move on")


class AlreadyRunning(LocalflowError):
    """Another live instance runs this task, and the task must run once (a capture: two would poll
    twice and race on one checkpoint). Retriable: the refused instance waits, with backoff, and
    starts once the other has left."""

    retriable = True
