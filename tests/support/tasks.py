"""A task of a catalog running inside the test's own event loop, supervised as in production.

Why in-process: most behaviour tests need the task's `TaskContext` (its status, its stopping
event) and no process boundary; the tests that kill or pause a task use `tests.support.workers`.

    async with running(catalog, "acme/cache", options={"reader": READER}) as ctx:
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pipeline.runtime.catalog import Catalog
from pipeline.runtime.task import TaskContext, kind_of, supervise
from pipeline.sdk.retry import Backoff

__all__ = ["running"]


@asynccontextmanager
async def running(catalog: Catalog, name: str, *, options: dict[str, Any] | None = None,
                  backoff: Backoff | None = None, restart_after: float | None = None,
                  restart_failed: bool = False, check_errors: bool = False,
                  stop_within: float = 30) -> AsyncIterator[TaskContext]:
    """The task, supervised in the background as in production; stopped (and awaited) on exit.

    ``options``: the task's runtime options (e.g. ``{"reader": READER}``). ``backoff``: the
    supervisor's between restarts (default: production's); ``restart_after`` is a short, fixed
    one (a test need not wait out the real one). ``restart_failed``: as `run --restart-failed`.
    ``check_errors``: once stopped, fail if the task recorded an error. ``stop_within``: the
    seconds it may take to stop (flush, commit) once the block ends.
    """
    if restart_after is not None:
        assert backoff is None, "give backoff or restart_after, not both"
        backoff = Backoff(initial=restart_after, maximum=restart_after)
    ctx = TaskContext(catalog, name, kind_of(catalog, name), options=dict(options or {}))
    task = asyncio.create_task(supervise(ctx, backoff, restart_failed=restart_failed))
    try:
        yield ctx
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, timeout=stop_within)
    if check_errors:
        assert ctx.status.last_error is None, f"{name}: {ctx.status.last_error}"
