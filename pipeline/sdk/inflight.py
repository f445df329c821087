"""A batch applied in the background while the runtime reads the next one: what an overlapping
materialization shares (Postgres loads its next batch while the last merges; Redis builds the next
chunks while the server runs the last ones).

The contract stays whole: ``apply`` reports a batch durable only once it is (the next ``apply``,
``tick`` or ``close`` reports it); a rebalance or rewind waits for the batch in flight and keeps
what it made durable for the next report; a failure in flight is raised by the next call, so the
task fails before anything after it is reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from pipeline.sdk.materialization import Applied


class InFlight:
    """At most one batch in flight (a connector may chain the next on ``task``), and its report."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Applied] | None = None
        """The batch in flight, if any."""
        self._settled = Applied()
        self._failure: BaseException | None = None

    def start(self, work: Coroutine[Any, Any, Applied]) -> asyncio.Task[Applied]:
        """Run ``work`` in the background as the batch in flight (the one before it, if any, must
        be awaited by ``work`` or by the caller)."""
        self.task = asyncio.create_task(work)
        return self.task

    async def outcome(self) -> Applied:
        """What is durable once the batch in flight is (see ``outcome_of``)."""
        return await self.outcome_of(self.task)

    async def outcome_of(self, task: asyncio.Task[Applied] | None) -> Applied:
        """What is durable once ``task`` is (None: nothing to wait for), with what was settled before.
        If it failed, the batch started behind it (the one in flight, if another) is dropped and the
        error raised."""
        self.raise_failure()
        if task is None:
            return self.take()
        try:
            applied = await task
        except BaseException:
            later, self.task = self.task, None
            if later is not task:
                await _drop(later)
            raise
        if self.task is task:
            self.task = None
        return self.take(applied)

    async def settle(self) -> None:
        """Wait for the batch in flight (a rebalance or rewind comes next); report it later."""
        task, self.task = self.task, None
        if task is not None:
            try:
                self._settled = self._settled.then(await task)
            except Exception as e:  # noqa: BLE001 - raised by the next apply, tick or close
                self._failure = e

    async def drop(self) -> None:
        """Cancel the batch in flight, as a crash would, and forget it."""
        task, self.task = self.task, None
        await _drop(task)

    def raise_failure(self) -> None:
        """Raise what a settled batch failed with (once)."""
        error, self._failure = self._failure, None
        if error is not None:
            raise error

    def take(self, applied: Applied | None = None) -> Applied:
        """What was settled, with ``applied`` after it, as one report; nothing is kept."""
        settled, self._settled = self._settled, Applied()
        return settled if applied is None else settled.then(applied)


async def _drop(task: asyncio.Task[Applied] | None) -> None:
    if task is None:
        return
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a failure of a dropped batch is not news
