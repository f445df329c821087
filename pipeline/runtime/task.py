"""The task lifecycle: build -> run until stopped -> close; supervision with restart and backoff.

A task is a capture, a derivation or a materialization of the catalog. ``run_tasks`` runs
any set of them in one process; each is supervised on its own, and its errors decide what
happens (pipeline/sdk/errors.py): after a retriable one it is restarted with exponential backoff
(the error logged and counted), after a non-retriable one it stops FAILED; the others go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pipeline.runtime.catalog import Catalog
from pipeline.runtime.collection import Collection, CollectionWriter
from pipeline.sdk.context import ConnectorTask
from pipeline.sdk.errors import ConfigError, LocalflowError, describe
from pipeline.sdk.materialization import Offsets
from pipeline.sdk.retry import Backoff
from pipeline.telemetry import metrics
from pipeline.telemetry.logs import current_task

TaskKind = Literal["capture", "derivation", "materialization"]


@dataclass
class TaskStatus:
    """What `/readyz` and `localflow status` report about one task of this process."""

    name: str
    kind: TaskKind
    running: bool = False
    connected: bool = False
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    last_progress_at: float | None = None
    documents: int = 0
    partitions: list[tuple[str, int]] = field(default_factory=list)
    """The input partitions this worker's consumer group member holds now (derivations, materializations)."""
    stopped_by: BaseException | None = None
    """The non-retriable error that stopped the task for good (it is not restarted)."""

    @property
    def failed(self) -> str | None:
        """Why the task stopped FAILED (``Type: message``), or None while it may still run."""
        return describe(self.stopped_by) if self.stopped_by is not None else None

    def progressed(self, documents: int = 0) -> None:
        self.last_progress_at = time.time()
        self.documents += documents

    def error(self, e: BaseException) -> None:
        """Note an error of the task (counted by kind, shown as its last error)."""
        metrics.ERRORS.labels(self.name, error_kind(e)).inc()
        self.last_error, self.last_error_at = describe(e), time.time()


@dataclass
class ReplayPlan:
    """What `localflow replay` asks of a materialization (``TaskContext.replay``; None in a normal
    run).

    The runtime applies it (pipeline/runtime/materialization.py); a connector sees only its effect,
    ``Batch.reapply``: the partitions whose records below the stored offset are to be applied again.
    """

    start_offsets: Offsets = field(default_factory=dict)
    """Where each partition starts when assigned, instead of the stored offset (dropped once durable)."""
    stop_at_end: Offsets | None = None
    """The task returns once the partitions it holds are read up to these offsets."""
    progress: Offsets | None = None
    """Filled in by the runtime: the next offset to read of each partition (for progress bars)."""


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What a connector gets of its task (``pipeline.sdk.context.Context``): these six names, none of
    them the catalog, a Kafka client or the task's status. Python cannot seal an object (a bound
    method still leads to its TaskContext); that connectors use only these is a checked rule
    (tests/test_runtime_policies.py walks their code)."""

    name: str
    log: logging.LoggerAdapter[logging.Logger]
    stopping: asyncio.Event
    sleep: Callable[[float], Awaitable[bool]]
    report: Callable[..., None]
    dead_letter: Callable[..., Awaitable[None]]


STATUS: dict[str, TaskStatus] = {}
"""Status of every task running in this process, by task name."""


@dataclass
class TaskContext:
    """Everything a task and its connector need; built by the runtime, not by connectors."""

    catalog: Catalog
    name: str
    kind: TaskKind
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    options: dict[str, Any] = field(default_factory=dict)
    """Runtime tuning from tests and benchmarks (``reader``: ReaderOptions, a derivation's
    ``slice_records`` and ``batch_seconds``)."""
    replay: ReplayPlan | None = None
    """What `localflow replay` asks of a materialization; None otherwise."""
    lease: Any = None
    """A capture's lease in cluster mode (``pipeline.runtime.cluster.Lease``); None outside a cluster."""

    def __post_init__(self) -> None:
        self.log = logging.LoggerAdapter(logging.getLogger(f"localflow.{self.kind}"), {"task": self.name})
        self.status = STATUS.setdefault(self.name, TaskStatus(self.name, self.kind))
        self._collections: dict[str, Collection] = {}
        self._dead_writer: CollectionWriter | None = None

    @property
    def kafka(self):  # noqa: ANN201 - KafkaConfig
        return self.catalog.kafka

    @cached_property
    def spec(self) -> Any:
        """The task's catalog entry: CaptureSpec, MaterializationSpec, or the derived CollectionSpec."""
        if self.kind == "capture":
            return self.catalog.captures[self.name]
        if self.kind == "materialization":
            return self.catalog.materializations[self.name]
        return self.catalog.collections[self.name]

    def for_connector(self) -> tuple[ConnectorContext, ConnectorTask]:
        """The narrow context and the ``ConnectorTask`` a connector is built with (``Connector.build(ctx, task)``)."""
        spec = self.spec
        sources = {b.target if self.kind == "capture" else b.source for b in spec.bindings}
        ctx = ConnectorContext(self.name, self.log, self.stopping, self.sleep, self.report, self.dead_letter)
        return ctx, ConnectorTask(spec, {name: self.collection(name) for name in sorted(sources)})

    def collection(self, name: str) -> Collection:
        """The compiled collection (cached per task)."""
        c = self._collections.get(name)
        if c is None:
            c = self._collections[name] = Collection.from_catalog(self.catalog, name)
        return c

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the task should stop instead of going on."""
        if self.stopping.is_set():
            return False
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            if self.lease is not None:  # a capture that may have slept through losing its lease polls only once sure
                await self.lease.confirmed()
            return True
        return False

    def report(self, error: BaseException | None = None, *, connected: bool | None = None) -> None:
        """A connector's news while it goes on: an error it handled, or whether its endpoint answers."""
        if error is not None:
            self.status.error(error)
        if connected is not None:
            self.status.connected = connected

    async def dead_letter(self, collection: str, error: str, original: bytes, **context: Any) -> None:
        """Send raw input that failed in this task to ``<topic>.dead`` (never drop it silently)."""
        if self._dead_writer is None:
            self._dead_writer = CollectionWriter(self.kafka, self.name)
            await self._dead_writer.start()
        await self._dead_writer.write_dead(self.collection(collection), error, original, **context)

    async def aclose(self) -> None:
        if self._dead_writer is not None:
            await self._dead_writer.stop()
            self._dead_writer = None


class Task(ABC):
    """One running task. ``run`` returns after ``ctx.stopping`` is set and everything is flushed.

    MUST: commit checkpoints only for work that is durable at the endpoint; on stop, flush open
    batches and commit before returning. MUST NOT: swallow an error it cannot handle (raise it:
    the supervisor logs, counts and restarts).
    """

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def run(self) -> None: ...


def build_task(ctx: TaskContext) -> Task:
    """The runtime task for a catalog task name (connectors are looked up in the registry)."""
    if ctx.kind == "capture":
        from pipeline.runtime.capture import CaptureTask

        return CaptureTask(ctx)
    if ctx.kind == "materialization":
        from pipeline.runtime.materialization import MaterializationTask

        return MaterializationTask(ctx)
    from pipeline.runtime.derivation import DerivationTask

    return DerivationTask(ctx)


def kind_of(catalog: Catalog, name: str) -> TaskKind:
    if name in catalog.captures:
        return "capture"
    if name in catalog.materializations:
        return "materialization"
    if name in catalog.derivations:
        return "derivation"
    raise ConfigError(f"{name!r} is not a task of the catalog; tasks: {', '.join(catalog.task_names())}", "--task")


async def supervise(ctx: TaskContext, backoff: Backoff | None = None, *, restart_failed: bool = False) -> None:
    """Run a task until ``ctx.stopping``; what an error does depends on its class.

    Retriable (and errors that are not a LocalflowError: a bug may be a race): restart with
    backoff. Not retriable (ConfigError, CheckpointError, ImplementationError, OffsetGap...):
    the task stops FAILED, with its reason in ``status.failed``, ``/readyz`` and
    ``localflow_task_failed``, until the process stops; ``restart_failed`` restarts those too.
    """
    backoff = backoff or Backoff()
    status = ctx.status
    current_task.set(ctx.name)  # library log lines from this coroutine name the task
    metrics.TASK_INFO.labels(ctx.name, ctx.kind).set(1)
    while not ctx.stopping.is_set():
        started = time.monotonic()
        status.running, status.stopped_by = True, None
        metrics.TASK_UP.labels(ctx.name).set(1)
        metrics.TASK_FAILED.labels(ctx.name).set(0)
        try:
            await build_task(ctx).run()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the supervisor is the place that catches everything
            kind = error_kind(e)
            status.error(e)
            if isinstance(e, LocalflowError) and not e.retriable and not restart_failed:
                status.stopped_by = e
                ctx.log.critical("task stopped FAILED (%s), not restarted: %s", kind, e)
            elif isinstance(e, LocalflowError):
                ctx.log.error("task failed (%s): %s", kind, e, exc_info=e.__cause__ is not None)
            else:
                ctx.log.exception("task failed with an unexpected error")
        finally:
            status.running = False
            status.connected = False
            metrics.TASK_UP.labels(ctx.name).set(0)
            await ctx.aclose()
        if status.stopped_by is not None:
            metrics.TASK_FAILED.labels(ctx.name).set(1)
            await ctx.stopping.wait()  # the process goes on (other tasks; /readyz says why this one stopped)
            return
        if time.monotonic() - started > backoff.healthy_after:
            backoff.attempt = 0
        delay = backoff.next()
        ctx.log.info("restarting in %.1fs", delay)
        if not await ctx.sleep(delay):
            return
        status.restarts += 1
        metrics.TASK_RESTARTS.labels(ctx.name).inc()


def error_kind(e: BaseException) -> str:
    """The ``kind`` label of an error in ``localflow_errors_total`` (a class attribute of our errors)."""
    return e.kind if isinstance(e, LocalflowError) else "internal"


async def run_tasks(catalog: Catalog, names: Sequence[str] | None, stopping: asyncio.Event,
                    options: dict[str, Any] | None = None, *, restart_failed: bool = False,
                    replay: ReplayPlan | None = None) -> None:
    """Run the named tasks (all when None) until ``stopping`` is set; each is supervised alone."""
    names = list(names) if names else catalog.task_names()
    contexts = [TaskContext(catalog, n, kind, stopping, dict(options or {}),
                            replay=replay if kind == "materialization" else None)
                for n in names for kind in [kind_of(catalog, n)]]
    await asyncio.gather(*(asyncio.create_task(supervise(c, restart_failed=restart_failed), name=TASK_PREFIX + c.name)
                           for c in contexts))


TASK_PREFIX = "localflow:"
"""Prefix of the asyncio task names ``run_tasks`` creates (to say which task did not stop)."""
