"""Waiting in tests: wait for a condition with a deadline instead of sleeping blindly.

Why: a fixed `sleep()` is either too short on a loaded CI machine (flaky) or too long everywhere
(slow). Polling returns as soon as the condition holds and, on timeout, says what was awaited
and what was last seen, so a failure is diagnosable from the message alone.

    from tests.support.waiting import wait_for, wait_for_async
    rows = await wait_for_async(lambda: conn.fetch("select * from t"), message="rows in t")
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

__all__ = ["wait_for", "wait_for_async"]

T = TypeVar("T")

_NOTHING = object()


def _timeout_error(message: str, timeout: float, last: object) -> AssertionError:
    shown = "(predicate never returned)" if last is _NOTHING else repr(last)
    return AssertionError(f"timed out after {timeout:g}s waiting for: {message}; last value: {shown}")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition to become true",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns a truthy value, and return that value.

    Exceptions of the types in `ignore` count as "not yet" (e.g. `ConnectionError` while a
    server restarts) and are reported as the last value; others propagate at once.
    Raises AssertionError with `message` and the last value when `timeout` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last: object = _NOTHING
    while True:
        try:
            last = predicate()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise _timeout_error(message, timeout, last)
        time.sleep(interval)  # polling interval, bounded by the deadline above


async def wait_for_async(
    predicate: Callable[[], Awaitable[T] | T],
    timeout: float = 10.0,  # noqa: ASYNC109 - same signature as wait_for; enforced with asyncio.timeout
    interval: float = 0.05,
    message: str = "condition to become true",
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Async `wait_for`: `predicate` may be a coroutine function or a plain function.

    Each call is itself bounded by the remaining time, so a hung await cannot outlive `timeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = _NOTHING
    while True:
        expired = False
        try:
            value = predicate()
            if inspect.isawaitable(value):
                scope = asyncio.timeout(max(deadline - loop.time(), 0))
                try:
                    async with scope:
                        value = await value
                except TimeoutError:
                    if not scope.expired():
                        raise  # the predicate's own TimeoutError, not our deadline
                    expired = True
        except ignore as exc:
            last = exc
        else:
            if not expired:
                last = value
                if value:
                    return cast(T, value)
        if expired or loop.time() >= deadline:
            raise _timeout_error(message, timeout, last)
        await asyncio.sleep(interval)  # polling interval, bounded by the deadline above
