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
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

import transforms
from pipeline import metrics
from pipeline.catalog import DeriveSpec
from pipeline.collection import (
    Collection,
    CollectionReader,
    CollectionWriter,
    ReaderOptions,
    Record,
    next_offsets,
)
from pipeline.task import Task, TaskContext

Document = dict[str, Any]


@dataclass(slots=True)
class Transformed:
    """What an engine made of one batch of one transform."""

    documents: list[Document] = field(default_factory=list)
    """Output documents, in input order (not yet validated: the writer does that)."""
    failed: list[tuple[int, str]] = field(default_factory=list)
    """``(index of the input document in the batch, why)`` for inputs the transform rejected."""

    def extend(self, other: Transformed, offset: int) -> None:
        """Append ``other``, whose input indexes start at ``offset`` of this batch."""
        self.documents.extend(other.documents)
        self.failed.extend((i + offset, why) for i, why in other.failed)


class Engine(ABC):
    """Runs the transforms of one derived collection over batches of source documents.

    Built once per worker by ``transforms.<engine>.build(catalog, collection)``; transform ``i``
    is ``derive.transforms[i]`` of the catalog. Documents are JSON objects (dicts), read back
    from the source collection (they were validated when written, and are not validated again).

    MUST: return from ``apply`` the outputs of every input it could transform and, in
    ``failed``, the index and reason of every input it could not; give the same input the same
    output keys every time (a batch is re-run after a crash). MUST NOT: raise for a bad input
    (the task would restart on the same batch forever), do I/O on Kafka, or rely on state kept
    between batches for correctness (state lives in the worker's memory and is lost on restart).
    """

    def open(self) -> None:  # noqa: B027 - optional hook
        """Once per worker, before the first batch (e.g. SQLite migrations)."""

    @abstractmethod
    def apply(self, transform: int, documents: Sequence[Document]) -> Transformed:
        """Transform one batch of documents of the transform's source."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``open`` took."""


class DerivationTask(Task):
    """Reads the sources as a consumer group, transforms batches, writes outputs, then commits."""

    poll_ms = 200

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self._batch_lock = asyncio.Lock()
        self._reader: CollectionReader | None = None

    async def run(self) -> None:
        ctx = self.ctx
        derive: DeriveSpec = ctx.spec.derive
        derived = ctx.collection(ctx.name)
        sources = {t.source: ctx.collection(t.source) for t in derive.transforms}
        routes: dict[str, _Route] = {}
        for i, t in enumerate(derive.transforms):
            routes.setdefault(sources[t.source].topic, _Route(t.source)).transforms.append((i, t.name))

        engine: Engine = transforms.engine_module(derive.engine).build(ctx.catalog, ctx.name)
        engine.open()
        writer = CollectionWriter(ctx.kafka, ctx.name)
        try:
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
                if not records:
                    continue
                started = time.perf_counter()
                async with self._batch_lock:  # a rebalance waits for this batch's commit
                    await self._derive(records, routes, derived, engine, writer)
                    await self._commit(reader, records)
                metrics.BATCH_SIZE.labels(ctx.name).observe(len(records))
                metrics.BATCH_SECONDS.labels(ctx.name).observe(time.perf_counter() - started)
                metrics.END_TO_END.labels(ctx.name, derived.name).observe(
                    max(0.0, time.time() - records[-1].timestamp_ms / 1000))
                ctx.status.progressed(len(records))
        finally:
            try:
                if self._reader is not None:
                    await self._reader.stop()
            finally:
                await writer.stop()
                engine.close()

    async def _derive(self, records: list[Record], routes: dict[str, _Route], derived: Collection,
                      engine: Engine, writer: CollectionWriter) -> None:
        """Transform and write one batch; returns when every output and dead letter is acknowledged."""
        pending: list[Awaitable[Any]] = []
        for topic, batch in _by_topic(records).items():
            route = routes[topic]
            inputs: list[Record] = []
            for r in batch:
                if r.error is None and type(r.doc) is dict:
                    inputs.append(r)
                else:
                    pending.append(writer.write_dead(
                        derived, r.error or f"not a JSON object: {type(r.doc).__name__}", r.value,
                        reason="unparseable", source=route.source, partition=r.partition, offset=r.offset))
            docs = [r.doc for r in inputs]
            for index, name in route.transforms:
                out = engine.apply(index, docs)
                pending.append(writer.write(derived, out.documents, transform=name, reason="invalid"))
                for i, why in out.failed:
                    r = inputs[i]
                    pending.append(writer.write_dead(
                        derived, f"transform {name!r} failed: {why}", r.value, reason="transform",
                        transform=name, source=route.source, partition=r.partition, offset=r.offset))
        await asyncio.gather(*pending)

    async def _commit(self, reader: CollectionReader, records: list[Record]) -> None:
        await reader.commit(next_offsets(records))
        metrics.checkpointed(self.ctx.name)

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
            pass


@dataclass(slots=True)
class _Route:
    """Where the records of one source topic go: its collection and the transforms that read it."""

    source: str
    transforms: list[tuple[int, str]] = field(default_factory=list)
    """``(index in derive.transforms, name)``"""


def _by_topic(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        batch = out.get(r.topic)
        if batch is None:
            batch = out[r.topic] = []
        batch.append(r)
    return out
