"""The tasks of one worker, reconciled with the effective catalog (file + config topic).

``Controller.run`` supervises each task with a stopping event of its own, so one task can be
started, stopped (after its flush), restarted or paused while the others go on. Every change,
from the API (through the config topic, so every worker sees it) or from the catalog file
(``--watch``), goes through one path: build the effective catalog, and if it validates, stop
the tasks that are gone, paused or changed, then start the new ones. A catalog that does not
validate is refused with the messages of `localflow validate`; the running set stays as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pipeline.control.effective import TASK_SECTIONS, Overlay, build, read_file
from pipeline.control.store import ConfigStore
from pipeline.runtime.catalog import Catalog
from pipeline.runtime.task import STATUS, TASK_PREFIX, TaskContext, TaskKind, kind_of, supervise
from pipeline.sdk.errors import ConfigError, LocalflowError
from pipeline.sdk.problems import Problem
from pipeline.telemetry import metrics

log = logging.getLogger("localflow.control")

STARTUP_WAIT = 5.0
"""Seconds the worker waits for the config topic before starting the file's tasks without it."""
WATCHED_SUFFIXES = {".yaml", ".yml", ".json"}
"""The catalog and the schema files it names (a Python transform is imported once: restart for it)."""


class NotFound(LocalflowError):
    """No such task or collection in the effective catalog."""


class Conflict(LocalflowError):
    """The request contradicts the catalog (a name taken, a task declared in the file)."""


class Unavailable(LocalflowError):
    """The config topic is off or not read yet: changes cannot be stored."""

    retriable = True


@dataclass
class Running:
    ctx: TaskContext
    task: asyncio.Task[None]
    fingerprint: Any


def fingerprint(catalog: Catalog, name: str) -> Any:
    """What a task's behaviour depends on: the broker, its own entry, the collections it touches."""
    kind = kind_of(catalog, name)
    if kind == "capture":
        spec: Any = catalog.captures[name]
        touched = [b.target for b in spec.bindings]
    elif kind == "materialization":
        spec = catalog.materializations[name]
        touched = [b.source for b in spec.bindings]
    else:
        spec = catalog.collections[name]
        touched = [t.source for t in spec.derive.transforms]
    return (catalog.kafka.model_dump(), spec.model_dump(),
            [catalog.collections[c].model_dump() for c in touched if c in catalog.collections])


def forget_series(name: str) -> None:
    """Drop a task's up/info series once this worker no longer runs it (removed, or its lease moved to
    another worker): a 0 left behind would read as a failed task (LocalflowTaskDown)."""
    for gauge, labels in ((metrics.TASK_UP, (name,)), *((metrics.TASK_INFO, (name, k)) for k in get_args(TaskKind))):
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


def problem_lines(e: ConfigError) -> list[str]:
    """The lines `localflow validate` prints for these problems (with their position in a file)."""
    return [str(p) if isinstance(p, Problem) else f"{p[0]}: {p[1]}" if p[0] else p[1] for p in e.problems]


class Controller:
    """Runs the tasks of the effective catalog (or those named by ``selected``) until ``stopping``."""

    def __init__(self, path: Path, catalog: Catalog, stopping: asyncio.Event, *, store: ConfigStore | None = None,
                 selected: list[str] | None = None, watch: bool = False, restart_failed: bool = False) -> None:
        self.path, self.base, self.catalog = path, catalog, catalog
        self.cluster: Any = None
        """In cluster mode (``pipeline.runtime.cluster.Cluster``): captures run only while it holds their lease."""
        self.stopping, self.store, self.watch = stopping, store, watch
        self.selected = set(selected) if selected else None
        self.restart_failed = restart_failed
        """Restart tasks after errors a restart would not fix too (`run --restart-failed`)."""
        self.file = read_file(path)
        self.running: dict[str, Running] = {}
        self.kinds: dict[str, TaskKind] = {}
        """The tasks this worker supervises now, by name (shared with the metrics server's /status)."""
        self.problems: list[str] = []
        """Why the last change was refused ([] when the effective catalog validates)."""
        self._restarts: set[str] = set()
        self._wake = asyncio.Event()
        self._version = self._applied = 0
        self._settled = asyncio.Condition()
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ reading

    def overlay(self) -> Overlay:
        return self.store.overlay() if self.store is not None else {}

    def paused(self) -> set[str]:
        return set(self.store.section("paused")) if self.store is not None else set()

    def origin(self, section: str, name: str) -> str:
        return "api" if name in (self.overlay().get(section) or {}) else "file"

    def effective(self, overlay: Overlay | None = None) -> Catalog:
        """The file plus ``overlay`` (default: the config topic's), validated; raises ConfigError."""
        overlay = self.overlay() if overlay is None else overlay
        if self.watch:
            return build(self.path, overlay)
        if not any(overlay.get(s) for s in TASK_SECTIONS):
            return self.base
        return build(self.path, overlay, file=self.file)  # the file as read at startup

    def state(self, name: str) -> tuple[str, str | None]:
        """RUNNING, PAUSED, FAILED (with its reason) or UNASSIGNED (not run by this worker)."""
        if name in self.paused():
            return "PAUSED", None
        status = STATUS.get(name)
        running = self.running.get(name)
        if running is None or status is None:
            return "UNASSIGNED", None
        if status.running:
            return "RUNNING", None
        if status.failed:
            return "FAILED", status.failed
        if status.last_error:
            return "FAILED", status.last_error
        return ("FAILED", "stopped") if running.task.done() else ("RUNNING", None)

    # ------------------------------------------------------------------ changing (the API)

    async def create(self, entries: Overlay) -> list[str]:
        """Add catalog entries through the config topic; ConfigError, Conflict or Unavailable."""
        store = await self._store()
        async with self._lock:
            current = self.catalog
            for section, items in entries.items():
                for name in items:
                    if self._declared(current, section, name):
                        raise Conflict(f"{section[:-1]} {name!r} already exists; delete it first")
            overlay = self.overlay()
            candidate = {s: {**(overlay.get(s) or {}), **(entries.get(s) or {})} for s in TASK_SECTIONS}
            self.effective(candidate)  # raises ConfigError: nothing is written
            for section in ("collections", "captures", "materializations"):  # collections before their users
                for name, value in (entries.get(section) or {}).items():
                    await store.put(section, name, value)
        await self.settle()
        return [n for items in entries.values() for n in items]

    async def delete(self, name: str) -> str:
        """Remove a task created through the API; it stops after a flush on every worker."""
        store = await self._store()
        async with self._lock:
            overlay = self.overlay()
            # a short-form capture shares its name with its collection: the task goes, the data stays
            section = next((s for s in ("captures", "materializations", "collections")
                            if name in (overlay.get(s) or {})), None)
            if section is None:
                self.task_kind(name)
                raise Conflict(f"task {name!r} is declared in {self.path}; remove it there "
                               "(with `localflow run --watch` it stops at once)")
            candidate = {s: dict(overlay.get(s) or {}) for s in TASK_SECTIONS}
            del candidate[section][name]
            self.effective(candidate)
            await store.put(section, name, None)
            if name in self.paused():
                await store.put("paused", name, None)
        await self.settle()
        return section

    async def pause(self, name: str) -> None:
        self.task_kind(name)
        await (await self._store()).put("paused", name, {"at": time.time()})
        await self.settle()

    async def resume(self, name: str) -> None:
        self.task_kind(name)
        await (await self._store()).put("paused", name, None)
        await self.settle()

    async def restart(self, name: str) -> None:
        self.task_kind(name)
        await (await self._store()).put("restart", name, {"id": uuid.uuid4().hex, "at": time.time()})
        await self.settle()

    def task_kind(self, name: str) -> TaskKind:
        """The task's kind in the effective catalog; NotFound when there is no such task."""
        try:
            return kind_of(self.catalog, name)
        except ConfigError:
            raise NotFound(f"no task {name!r}; tasks: {', '.join(self.catalog.task_names()) or 'none'}") from None

    async def _store(self) -> ConfigStore:
        """The store, once read to its end (a change made before would be judged on stale state)."""
        if self.store is None:
            raise Unavailable("this worker runs without a config topic (--config-topic ''): changes cannot be stored")
        if not await self.store.wait_caught_up(STARTUP_WAIT):
            raise Unavailable(f"the config topic {self.store.topic} is not read yet (is Kafka reachable?)")
        return self.store

    @staticmethod
    def _declared(catalog: Catalog, section: str, name: str) -> bool:
        return name in getattr(catalog, section) or (section != "collections" and name in catalog.task_names())

    async def settle(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109
        """Wait until every change requested so far is applied (or refused)."""
        target = self._version
        async with self._settled:
            await asyncio.wait_for(self._settled.wait_for(lambda: self._applied >= target), timeout)

    def request(self) -> None:
        """Ask for a reconcile (a change arrived)."""
        self._version += 1
        self._wake.set()

    def _on_change(self, key: tuple[str, str], value: Any, live: bool) -> None:
        section, name = key
        if section == "restart":
            if not live or value is None:
                return
            self._restarts.add(name)
        self.request()

    # ------------------------------------------------------------------ running

    async def open(self) -> None:
        """Start reading the config topic and wait (a little) until it is read; idempotent."""
        if self.store is None or self.store.on_change is not None:
            return
        self.store.on_change = self._on_change
        await self.store.start()
        stop = asyncio.create_task(self.stopping.wait())
        try:
            read = asyncio.create_task(self.store.wait_caught_up(STARTUP_WAIT))
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)  # a SIGTERM ends the wait
            if not read.done():
                read.cancel()
            elif not read.result():
                log.warning("config topic %s not read within %gs: starting the file's tasks; tasks created "
                            "through the API start once it is read", self.store.topic, STARTUP_WAIT)
        except LocalflowError as e:
            log.warning("config topic %s: %s", self.store.topic, e)
        finally:
            stop.cancel()

    async def run(self) -> None:
        """Supervise the tasks until ``stopping``; then stop every one (each flushes) and return."""
        watcher = None
        await self.open()
        if self.watch:
            watcher = asyncio.create_task(self._watch(), name="localflow-watch")
        self.request()
        try:
            while not self.stopping.is_set():
                await self._reconcile()
                waits = {asyncio.create_task(self._wake.wait()), asyncio.create_task(self.stopping.wait())}
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
        finally:
            if watcher is not None:
                watcher.cancel()
            await self._stop(dict.fromkeys(self.running, "shutdown"))
            if self.store is not None:
                await self.store.stop()

    async def _reconcile(self) -> None:
        self._wake.clear()
        version = self._version
        try:
            catalog = self.effective()
        except ConfigError as e:
            lines = problem_lines(e)
            if lines != self.problems:
                log.error("catalog %s is not valid; the running tasks stay as they were:\n%s",
                          self.path, "\n".join(f"  {ln}" for ln in lines))
            self.problems = lines
        else:
            if self.problems:
                log.info("catalog %s is valid again", self.path)
            self.problems = []
            await self._apply(catalog)
        async with self._settled:
            self._applied = max(self._applied, version)
            self._settled.notify_all()

    async def _apply(self, catalog: Catalog) -> None:
        paused = self.paused()
        names = [n for n in catalog.task_names() if (self.selected is None or n in self.selected)
                 and (self.cluster is None or n not in catalog.captures or self.cluster.holds(n))]
        wanted = {n: fingerprint(catalog, n) for n in names if n not in paused}
        restarts, self._restarts = self._restarts, set()
        gone = [n for n in self.running if n not in names]
        stop = {n: "lease released" if n in catalog.captures else "removed" for n in gone}
        stop.update({n: "paused" for n in self.running if n in paused and n not in stop})
        stop.update({n: "changed" for n, r in self.running.items()
                     if n in wanted and n not in stop and r.fingerprint != wanted[n]})
        stop.update({n: "restart requested" for n in restarts if n in self.running and n not in stop})
        await self._stop(stop)
        for name in gone:
            STATUS.pop(name, None)
            forget_series(name)
        self.catalog = catalog
        for name, fp in wanted.items():
            if name not in self.running:
                self._start(catalog, name, fp, "restarting" if name in stop else "starting")

    def _start(self, catalog: Catalog, name: str, fp: Any, verb: str) -> None:
        kind = kind_of(catalog, name)
        ctx = TaskContext(catalog, name, kind, asyncio.Event())
        if self.cluster is not None and kind == "capture":
            ctx.lease = self.cluster.lease(name)
        if self.stopping.is_set():
            ctx.stopping.set()
        self.kinds[name] = kind
        self.running[name] = Running(ctx, asyncio.create_task(supervise(ctx, restart_failed=self.restart_failed),
                                                          name=TASK_PREFIX + name), fp)
        log.info("%s %s %s", verb, kind, name)

    async def _stop(self, reasons: dict[str, str]) -> None:
        """Stop tasks together; each flushes its batch and commits its checkpoint first."""
        for name, reason in reasons.items():
            if reason != "shutdown":
                log.info("stopping %s (%s)", name, reason)
        stopped = [self.running.pop(n) for n in reasons if n in self.running]
        for r in stopped:
            self.kinds.pop(r.ctx.name, None)
            r.ctx.stopping.set()
        await asyncio.gather(*(r.task for r in stopped), return_exceptions=True)

    async def _watch(self) -> None:
        """Reconcile when the catalog file (or a file next to it, e.g. a schema) changes."""
        from watchfiles import awatch

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its "N changes detected" per event
        target = str(self.path.resolve())

        def relevant(_: object, path: str) -> bool:  # not logs written next to the catalog, say
            return path == target or Path(path).suffix in WATCHED_SUFFIXES

        async for _ in awatch(Path(target).parent, watch_filter=relevant, stop_event=self.stopping,
                              debounce=200, step=50):
            log.info("catalog %s changed: reloading", self.path)
            self.request()

