"""The one retry engine: ``Retry`` (the settings every connector embeds as ``advanced.retry``), and
``Attempts`` over it, which waits with the task's stop-aware sleep; ``Backoff`` is its clock
(exponential with jitter), also the supervisor's between restarts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import Field

from pipeline.sdk.config import Duration, Model


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after a run that lasted ``healthy_after``."""

    initial: float = 0.5
    maximum: float = 30.0
    healthy_after: float = 60.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)


class Retry(Model):
    """How a connector retries its endpoint while it fails transiently: waits that double from
    ``initial_backoff`` up to ``max_backoff`` (with jitter), until ``max_retries`` or
    ``give_up_after``, whichever comes first; a stop ends the waiting at once."""

    initial_backoff: Duration = Field(default=0.2, gt=0, description="First wait; it doubles each retry, with jitter.")
    max_backoff: Duration = Field(default=10.0, gt=0,
                                  description="Longest wait between two attempts (a server's Retry-After included).")
    max_retries: int | None = Field(default=None, ge=0,
                                    description="Retries of one operation before giving up; none: no limit.")
    give_up_after: Duration | None = Field(default=None, gt=0, description=(
        "Give up once retrying would last longer than this; none: retry until the task stops."))

    def attempts(self, sleep: Callable[[float], Awaitable[bool]]) -> Attempts:
        """A fresh retry budget for one operation; ``sleep`` is the task's (``ctx.sleep``)."""
        return Attempts(self, sleep)


class Attempts:
    """One operation's retries. After a failed attempt: ``delay()`` is the wait before the next (None:
    give up), ``await sleep(delay)`` waits it (False: the task is stopping)."""

    def __init__(self, retry: Retry, sleep: Callable[[float], Awaitable[bool]]) -> None:
        self.retry, self.sleep = retry, sleep
        self.backoff = Backoff(initial=retry.initial_backoff, maximum=retry.max_backoff)
        self.started = time.monotonic()
        self.retries = 0
        """Retries so far (attempts after the first)."""

    def delay(self, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retrying (``retry_after``: what the server asked for), or None."""
        r = self.retry
        if r.max_retries is not None and self.retries >= r.max_retries:
            return None
        wait = min(self.backoff.next() if retry_after is None else retry_after, r.max_backoff)
        if r.give_up_after is not None and time.monotonic() + wait - self.started > r.give_up_after:
            return None
        self.retries += 1
        return wait

    async def wait(self, retry_after: float | None = None) -> bool:
        """Wait before the next attempt; False when giving up or stopping."""
        delay = self.delay(retry_after)
        return delay is not None and await self.sleep(delay)
