"""The `files` capture: tails log files under a directory (SPEC "sophia/agent_logs").

File-system events (watchfiles) wake the capture as lines are written; a full rescan every
``interval`` catches whatever events missed (network mounts, a watch limit, a directory
that did not exist yet). The file work itself is synchronous (``Tailer``) and runs in a
worker thread, so a scan of many files never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from watchfiles import awatch

from connectors.files.config import FilesConfig
from connectors.files.tailer import Tailer
from pipeline.sdk.capture import Capture, Captured
from pipeline.sdk.connector import Check
from pipeline.sdk.errors import ConfigError

_MIN_INTERVAL = 0.1
_WATCH_DEBOUNCE_MS = 250
"""A file written without pause still wakes the capture four times a second. A file must stay
under a name the globs match for longer than that (plus one batch write) to be seen at all:
files rotated away faster than that are missed (measured: none lost at 1 s per file)."""
_WATCH_STEP_MS = 50
"""Quiet time after which a burst of events wakes the capture."""


class FilesCapture(Capture):
    """Yields up to ``batch_lines`` lines per item, with the offsets of every known file after them."""

    config: FilesConfig

    async def open(self) -> None:
        directory = self.config.directory
        problem = _directory_problem(directory)
        if problem == _NOT_A_DIRECTORY:
            raise ConfigError(f"{directory} {problem}", f"captures.{self.ctx.name}.endpoint.files.directory")
        if problem:
            self.ctx.log.warning("directory %s %s; looking again every %gs", directory, problem, self.spec.interval)

    async def run(self, state: dict[str, Any] | None) -> AsyncIterator[Captured]:
        tailer = Tailer(self.config, [b.parsed for b in self.spec.bindings], state, self.ctx.log, self.ctx.name)
        interval = max(self.spec.interval, _MIN_INTERVAL)
        watch = _Watch(tailer.root, self.ctx.log) if self.config.advanced.watch else None
        last_full = float("-inf")
        try:
            while not self.ctx.stopping.is_set():
                full = time.monotonic() - last_full >= interval
                changed = watch.take() if watch else set()
                if full:
                    last_full = time.monotonic()
                item, more = await asyncio.to_thread(tailer.poll, None if full else changed)
                if item is not None:
                    yield item
                if not more:
                    await self._wait(watch, last_full + interval - time.monotonic())
        finally:
            if watch:
                await watch.stop()
            await asyncio.to_thread(tailer.close)

    async def _wait(self, watch: _Watch | None, seconds: float) -> None:
        """Until a file event, the next rescan, or stopping."""
        if seconds <= 0:
            return
        if watch is None:
            await self.ctx.sleep(seconds)
            return
        waiters = [asyncio.ensure_future(watch.woken.wait()), asyncio.ensure_future(self.ctx.stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


class _Watch:
    """Collects changed paths from watchfiles in the background and signals ``woken``."""

    def __init__(self, root: str, log: Any) -> None:
        self.root = root
        self.log = log
        self.woken = asyncio.Event()
        self._changed: set[str] = set()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"watch {root}")

    def take(self) -> set[str]:
        changed, self._changed = self._changed, set()
        self.woken.clear()
        return changed

    async def stop(self) -> None:
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, timeout=5)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            if await asyncio.to_thread(os.path.isdir, self.root):
                try:
                    async for changes in awatch(self.root, stop_event=self._stop, watch_filter=None,
                                                debounce=_WATCH_DEBOUNCE_MS, step=_WATCH_STEP_MS,
                                                ignore_permission_denied=True):
                        self._changed.update(path for _, path in changes)
                        self.woken.set()
                    return
                except (OSError, RuntimeError) as e:
                    if not warned:
                        self.log.warning("no file events for %s (%s): relying on the periodic rescan", self.root, e)
                        warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=5)


_NOT_A_DIRECTORY = "is not a directory"


def _directory_problem(directory: str) -> str:
    """Why the capture cannot list ``directory`` now ('' when it can)."""
    if not os.path.exists(directory):
        return "does not exist (yet)"
    if not os.path.isdir(directory):
        return _NOT_A_DIRECTORY
    if not os.access(directory, os.R_OK | os.X_OK):
        return "is not readable by this user"
    return ""


async def doctor(config: FilesConfig) -> list[Check]:
    """Whether the directory exists and can be listed and read."""
    problem = await asyncio.to_thread(_directory_problem, config.directory)
    return [Check(f"files directory {config.directory}", not problem, problem)]
