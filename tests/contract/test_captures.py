"""Every registered capture against its contract (pipeline/sdk/capture.py), driven in-process
against a source the test controls: resume from a checkpoint, stop within the grace period, a bad
source body as a dead letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline.runtime.capture import STOP_GRACE
from pipeline.sdk.capture import Captured
from tests.contract.conftest import Origin

WITHIN = 30.0
"""Deadline for a capture to yield what its source offers (polls are immediate; a loaded machine is slow)."""


async def until(items: AsyncIterator[Captured], done: Callable[[list[Captured]], bool]) -> list[Captured]:
    """Items of a running capture until ``done`` says enough (a deadline, never a blind sleep)."""
    seen: list[Captured] = []
    async with asyncio.timeout(WITHIN):
        async for item in items:
            seen.append(item)
            if done(seen):
                return seen
    raise AssertionError(f"the capture ended after {len(seen)} items without reaching its condition")


async def stopped(ctx: Any, items: AsyncIterator[Captured]) -> float:
    """Set ``stopping`` and drain the capture: how long it took to return."""
    began = time.monotonic()
    ctx.stopping.set()
    async with asyncio.timeout(STOP_GRACE * 4):
        async for _ in items:
            pass
    return time.monotonic() - began


def keys(origin: Origin, items: list[Captured]) -> set[str]:
    return {d["metadata"]["id"] for item in items for _, d in item.documents if not origin.source.ephemeral(d)}


def state_of(items: list[Captured]) -> dict[str, Any] | None:
    return next((i.state for i in reversed(items) if i.state is not None), None)


async def test_resume_from_a_checkpoint_emits_the_same_keys(capture: Origin) -> None:
    for i in range(3):
        capture.source.add(i)
    ctx = capture.context()
    first = capture.build(ctx)
    await first.open()
    run = first.run(None)
    got = await until(run, lambda seen: len(keys(capture, seen)) >= 3)
    await stopped(ctx, run)
    await first.close()
    before, state = keys(capture, got), state_of(got)
    assert len(before) == 3 and state is not None

    capture.source.add(3)  # one new source record: its key is the only new one after the resume
    ctx = capture.context()
    second = capture.build(ctx)
    await second.open()
    run = second.run(state)
    again = await until(run, lambda seen: bool(keys(capture, seen) - before))
    await stopped(ctx, run)
    await second.close()
    assert len(keys(capture, again) - before) == 1, sorted(keys(capture, again) - before)


async def test_stops_within_the_grace_period(capture: Origin) -> None:
    capture.source.add(0)
    ctx = capture.context(interval="30s")  # stopping must cut the wait for the next poll short
    cap = capture.build(ctx)
    await cap.open()
    run = cap.run(None)
    await until(run, lambda seen: bool(keys(capture, seen)))
    took = await stopped(ctx, run)
    await cap.close()
    assert took < STOP_GRACE, f"{capture.connector} took {took:.1f}s to stop"


async def test_a_bad_source_body_becomes_a_dead_letter(capture: Origin) -> None:
    capture.source.spoil()
    capture.source.add(0)
    ctx = capture.context()
    cap = capture.build(ctx)
    await cap.open()
    run = cap.run(None)
    got = await until(run, lambda seen: any(i.dead for i in seen) and bool(keys(capture, seen)))
    await stopped(ctx, run)
    await cap.close()
    [(binding, error, original)] = [d for i in got for d in i.dead]
    assert binding == 0 and error and original
