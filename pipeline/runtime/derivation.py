"""Derivations: a collection computed from other collections by an engine (``sqlite`` or ``python``).

The guarantee (SPEC "derivation") is exactly once *per key*, not per message. Brokers without
Kafka transactions (Tansu) cannot make "write outputs + commit inputs" atomic, so the worker
orders them instead: it writes a batch's outputs, waits until the broker acknowledged every one,
and only then commits the batch's input offsets to its consumer group ``localflow.<collection>``
(the committed group offsets are this task's checkpoint). A crash between the two re-reads
that batch on restart and writes its outputs again under the same keys, because output keys are
computed from the input documents (the Sophia derivation keys by the raw ``metadata.id``).
Readers that keep the latest document per key (every materialization) see each output once;
a raw reader of the topic may see a key twice, the second copy differing at most in values the
lambda takes from the clock (``processed_at``).

Order comes from the source, not from the derived topic. A worker that stalls past its session
(a GC pause, CPU starvation, SIGSTOP) still holds a batch; its partitions move to another worker,
which derives the same inputs and newer ones, and the stalled worker may then write its old
outputs after them (its commit fails, but the records are out: the topic reads ``v1, v2, v1``).
Without Kafka transactions nothing can stop that write, so it is made harmless instead: every
output carries, in the ``localflow-source`` header, the source position it came from (the
input's own header when the input is itself derived, so chains keep the first clock), and every
endpoint that keeps state per key refuses a document whose source position is not newer than
the one the key holds. Engine work runs on a thread of its own in slices, so heartbeats go on
during a slow lambda, and a batch that runs past ``batch_seconds`` commits what it derived and
leaves the rest for the next poll. A batch's acknowledgements and commit overlap the next poll
and derivation (commits stay in batch order; a rebalance and a stop wait for them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import TopicPartition

from pipeline.runtime.catalog import DeriveSpec
from pipeline.runtime.collection import (
    Collection,
    CollectionReader,
    CollectionWriter,
    ReaderOptions,
)
from pipeline.runtime.registry import engine_module
from pipeline.runtime.task import Task, TaskContext
from pipeline.sdk.engine import Engine
from pipeline.sdk.errors import ImplementationError, describe
from pipeline.sdk.records import Record, next_offsets
from pipeline.telemetry import metrics

T = TypeVar("T")


class DerivationTask(Task):
    """Reads the sources as a consumer group, transforms batches, writes outputs, then commits.

    Runtime options: ``reader`` (ReaderOptions), ``slice_records`` (inputs per engine call) and
    ``batch_seconds`` (after this long a batch stops at the end of its current slice).
    """

    poll_ms = 200
    slice_records = 1000
    batch_seconds = 10.0
    _as_text = False
    """Whether the engine takes documents as JSON text (``apply_json``)."""

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self._batch_lock = asyncio.Lock()
        self._reader: CollectionReader | None = None
        self._acked: asyncio.Future[None] | None = None
        """The last batch's acknowledgements, then its commit (after the batches before it)."""
        # One thread for the engine: SQLite connections belong to the thread that opened them.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix=f"engine {ctx.name}")

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """Engine work on the engine's thread, so the loop keeps heartbeats and acknowledgements going."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, work, *args)

    async def run(self) -> None:
        ctx = self.ctx
        derive: DeriveSpec = ctx.spec.derive
        derived = ctx.collection(ctx.name)
        sources = {t.source: ctx.collection(t.source) for t in derive.transforms}
        routes: dict[str, _Route] = {}
        for i, t in enumerate(derive.transforms):
            routes.setdefault(sources[t.source].topic, _Route(t.source)).transforms.append((i, t.name))
        slice_records = int(ctx.options.get("slice_records", self.slice_records))
        batch_seconds = float(ctx.options.get("batch_seconds", self.batch_seconds))

        for route in routes.values():
            route.objects = sources[route.source].schema.get("type") == "object"
        engine: Engine = engine_module(derive.engine).build(ctx.catalog, ctx.name)
        self._as_text = type(engine).apply_json is not Engine.apply_json
        writer = CollectionWriter(ctx.kafka, ctx.name)
        try:
            await self._off_loop(engine.open)
            await writer.start()
            # Known topics first, so the concurrent writes of a batch never create them twice; a source
            # nobody wrote yet must exist, or the group is assigned nothing until a metadata refresh.
            await writer.ensure([derived])
            await writer.admin.ensure({c.topic: (c.partitions, c.replication_factor, c.topic_configs) for c in sources.values()})
            self._reader = reader = CollectionReader(
                ctx.kafka, f"localflow.{ctx.name}", list(sources.values()), on_assign=self._assigned,
                on_revoke=self._revoked, options=ReaderOptions(**ctx.options.get("reader", {})), task=ctx.name)
            await reader.start()
            ctx.status.connected = True
            while not ctx.stopping.is_set():
                records = await reader.batch(timeout_ms=self.poll_ms)
                if self._acked is not None and self._acked.done():
                    acked, self._acked = self._acked, None
                    acked.result()  # a write that failed fails the task: nothing after it was committed
                if not records:
                    continue
                started = time.perf_counter()
                async with self._batch_lock:  # a rebalance waits for this batch's commit
                    done, pending = await self._derive(records, routes, derived, engine, writer,
                                                       slice_records, started + batch_seconds)
                    if done < len(records):
                        self._rewind(reader, records[done:])
                    self._acked = asyncio.ensure_future(
                        self._acknowledged(self._acked, pending, reader, records[:done]))
                metrics.BATCH_SIZE.labels(ctx.name).observe(done)
                metrics.BATCH_SECONDS.labels(ctx.name).observe(time.perf_counter() - started)
                metrics.END_TO_END.labels(ctx.name, derived.name).observe(
                    max(0.0, time.time() - records[done - 1].timestamp_ms / 1000))
            if self._acked is not None:  # a stop: the last batch is committed
                await self._acked
        finally:
            try:
                if self._acked is not None and not self._acked.done():
                    self._acked.cancel()
                if self._reader is not None:
                    await self._reader.stop()
            finally:
                try:
                    await writer.stop()
                finally:
                    await self._off_loop(engine.close)
                    self._engine_thread.shutdown(wait=False)

    async def _derive(self, records: list[Record], routes: dict[str, _Route], derived: Collection,
                      engine: Engine, writer: CollectionWriter, slice_records: int,
                      deadline: float) -> tuple[int, list[asyncio.Future[Any]]]:
        """Transform and write the batch slice by slice, until done or past ``deadline``.

        Returns how many records (a prefix of ``records``, so a prefix of each partition) were
        derived, and the writes of their outputs and dead letters (not yet acknowledged).
        """
        pending: list[asyncio.Future[Any]] = []
        done = 0
        try:
            while done < len(records):
                part = records[done:done + slice_records]
                for topic, batch in _by_topic(part).items():
                    await self._derive_topic(routes[topic], batch, derived, engine, writer, pending)
                done += len(part)
                if time.perf_counter() >= deadline:
                    break
        except BaseException:
            _cancel(pending)
            raise
        return done, pending

    async def _acknowledged(self, before: asyncio.Future[None] | None, pending: list[asyncio.Future[Any]],
                            reader: CollectionReader, records: list[Record]) -> None:
        """Commit ``records`` once their writes are acknowledged and the batch ``before`` committed."""
        try:
            await asyncio.gather(*pending)
        except BaseException:
            _cancel(pending)  # a failed write fails the batch: nothing of it is left running
            raise
        if before is not None:
            await before
        await self._commit(reader, records)
        self.ctx.status.progressed(len(records))

    async def _derive_topic(self, route: _Route, batch: list[Record], derived: Collection, engine: Engine,
                            writer: CollectionWriter, pending: list[asyncio.Future[Any]]) -> None:
        """Start the writes of one topic's records of a slice (outputs and dead letters) into ``pending``."""
        inputs: list[Record] = []
        as_text = route.objects and self._as_text
        for r in batch:
            # Written by localflow's writer into a collection of objects: a JSON object, undecoded.
            if (as_text and r.from_writer) or (r.error is None and type(r.doc) is dict):
                inputs.append(r)
            else:
                pending.append(asyncio.ensure_future(writer.write_dead(
                    derived, r.error or f"not a JSON object: {type(r.doc).__name__}", r.value,
                    reason="unparseable", source=route.source, partition=r.partition, offset=r.offset)))
        if not inputs:
            return
        texts = [r.value.decode() for r in inputs] if self._as_text else None
        docs: list[Any] | None = None
        positions = [_position(r) for r in inputs]
        for index, name in route.transforms:
            try:
                out = await self._off_loop(engine.apply_json, index, texts) if texts is not None else None
                if out is None:
                    if docs is None:
                        docs = [r.doc for r in inputs]
                    out = await self._off_loop(engine.apply, index, docs)
            except Exception as e:
                raise ImplementationError(
                    f"engine {self.ctx.spec.derive.engine} of {self.ctx.name} raised {describe(e)} in transform "
                    f"{name!r} on a batch of {len(inputs)} documents: an engine MUST NOT raise for a bad input, it "
                    "lists it in `failed` (pipeline/sdk/engine.py)") from e
            pending.append(asyncio.ensure_future(writer.write(
                derived, out.documents, positions=[positions[i] for i in out.sources],
                transform=name, reason="invalid")))
            for i, why in out.failed:
                r = inputs[i]
                pending.append(asyncio.ensure_future(writer.write_dead(
                    derived, f"transform {name!r} failed: {why}", r.value, reason="transform",
                    transform=name, source=route.source, partition=r.partition, offset=r.offset)))

    async def _commit(self, reader: CollectionReader, records: list[Record]) -> None:
        await reader.commit(next_offsets(records))
        metrics.checkpointed(self.ctx.name)

    def _rewind(self, reader: CollectionReader, rest: list[Record]) -> None:
        """Read the records a batch did not get to again, from the next poll on."""
        first: dict[TopicPartition, int] = {}
        for r in rest:
            first.setdefault(r.tp, r.offset)
        for tp, offset in first.items():
            reader.consumer.seek(TopicPartition(*tp), offset)
        self.ctx.log.info("batch past its time bound: %d records left for the next poll", len(rest))

    async def _assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Resume each partition from the group's committed offset (None: from the beginning)."""
        assert self._reader is not None
        positions = {tp: await self._reader.consumer.committed(tp) for tp in partitions}
        self.ctx.log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{positions[tp] or 0}"
                                                    for tp in sorted(partitions)))
        return positions

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        """Let the batch in flight commit before its partitions move to another worker."""
        async with self._batch_lock:
            if self._acked is not None:  # its failure is raised by the task's loop
                await asyncio.wait([self._acked])


def _cancel(futures: list[asyncio.Future[Any]]) -> None:
    for f in futures:
        f.cancel()


def _position(record: Record) -> bytes:
    """The SOURCE_HEADER of what ``record`` derives: its own source position (see ``Record.source``)."""
    clock, offset = record.source
    return f"{clock}:{offset}".encode()


@dataclass(slots=True)
class _Route:
    """Where the records of one source topic go: its collection and the transforms that read it."""

    source: str
    transforms: list[tuple[int, str]] = field(default_factory=list)
    """``(index in derive.transforms, name)``"""
    objects: bool = False
    """Whether the source's schema says its documents are objects (so written ones need no check)."""


def _by_topic(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        batch = out.get(r.topic)
        if batch is None:
            batch = out[r.topic] = []
        batch.append(r)
    return out
