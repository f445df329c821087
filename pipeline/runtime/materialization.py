"""The runtime task that feeds a materialization from Kafka (its contract: pipeline/sdk/materialization.py).

A materialization keeps its own checkpoint (next offset per partition) *in its endpoint*,
committed with the data: Postgres in the same transaction, Redis in the same MULTI/EXEC, S3
in the object names. Several workers of one materialization share its partitions through a
consumer group (``localflow.<task>``); on assignment the runtime asks the connector where each
partition resumes, and seeks there. Kafka's committed group offsets are advisory only (for
lag in `localflow status`), never the source of truth.

The runtime counts what the connector says it applied (``Applied``), checks the offsets it says
are durable (never behind what it resumed from or made durable before, never beyond what it was
given: else an ImplementationError stops the task) and, when ``apply`` raises ``Backpressure``,
pauses the batch's partitions and applies the same batch again later, without a restart.

The replay plan (``TaskContext.replay``, a ``ReplayPlan``) that `localflow replay` sets to backfill
an endpoint:

* ``start_offsets`` (``{TopicPartition: offset}``): where a partition starts when it is assigned,
  instead of the stored offset ``assigned()`` returns. ``assigned()`` is still called, so the
  connector fences as usual; ``apply()`` then receives records *below* its stored offset and
  MUST apply them (a replay re-applies on purpose; upserts and "never older" rules keep it
  safe). An entry is dropped once a batch of its partition is durable, so a later
  re-assignment resumes from the endpoint's checkpoint, which by then covers the replay.
* ``stop_at_end`` (``{TopicPartition: offset}``): the task returns (flushing and committing
  as on a stop) once every one of these partitions that this worker holds has been read up to
  its offset. Where the stored offset is further, the entry is raised to it, so the endpoint's
  checkpoint never ends behind where it was, unless the stored offset is beyond the partition's
  end (an offset gap: the topic was recreated), where the replay is the way forward and the
  endpoint's checkpoint ends at the partition's end. Partitions another worker of the group
  holds are not waited for.
* ``progress`` (``{TopicPartition: offset}``, filled in by the task): the next offset to read
  of each partition, after each applied batch (for progress bars).
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from typing import Any

from aiokafka import TopicPartition

from pipeline.runtime.catalog import MaterializationSpec
from pipeline.runtime.collection import Collection, CollectionReader, ReaderOptions
from pipeline.runtime.task import Task, TaskContext
from pipeline.sdk.errors import Backpressure, EndpointError, Fenced, ImplementationError
from pipeline.sdk.materialization import Applied, Batch, Materialization, Offsets
from pipeline.sdk.records import Record
from pipeline.sdk.retry import Backoff
from pipeline.telemetry import metrics

HOLD_NOTHING_FOR = 45.0
"""Seconds a replaying worker that was assigned partitions may hold none before it stops waiting:
longer than a rebalance takes (a session timeout, 10 s by default, plus the join)."""


class MaterializationTask(Task):
    """Reads the bindings' collections as a consumer group and applies batches."""

    poll_ms = 200
    _ever_assigned = False
    _empty_since: float | None = None

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self._gaps: Offsets = {}
        """Replayed partitions whose stored offset was beyond their end: where each ends."""
        self._floor: Offsets = {}
        """Per partition, the lowest offset the connector may say is durable: where it resumed, then
        the last offset it made durable (never backwards)."""
        self._read: Offsets = {}
        """Per partition, the offset after the last record given to the connector (never beyond)."""

    async def run(self) -> None:
        from pipeline.runtime.registry import load_connector

        ctx = self.ctx
        spec: MaterializationSpec = ctx.spec
        collections: list[Collection] = [ctx.collection(b.source) for b in spec.bindings]
        bindings = {c.topic: i for i, c in enumerate(collections)}
        m: Materialization = load_connector(spec.connector).build(*ctx.for_connector())
        await m.open()
        ctx.status.connected = True
        reader = CollectionReader(ctx.kafka, f"localflow.{ctx.name}", collections,
                                  on_assign=self._assigned(m), on_revoke=m.revoked,
                                  options=ReaderOptions(**ctx.options.get("reader", {})), task=ctx.name)
        await reader.start()
        failed = True
        replay = ctx.replay
        try:
            while not ctx.stopping.is_set():
                records = await reader.batch(timeout_ms=self.poll_ms)
                if records:
                    started = time.perf_counter()
                    batch = Batch(records, bindings, frozenset(replay.start_offsets) if replay is not None else frozenset())
                    self._read.update(batch.next_offsets())
                    try:
                        applied = await self._apply(m, reader, batch)
                    except Fenced as e:
                        ctx.log.warning("replaced by another worker, batch of %d dropped: %s", len(records), e)
                        raise
                    if applied is None:  # stopping while the endpoint pushed back: nothing of it is durable
                        break
                    metrics.BATCH_SIZE.labels(ctx.name).observe(len(records))
                    metrics.BATCH_SECONDS.labels(ctx.name).observe(time.perf_counter() - started)
                    self._latency(records, collections)
                    ctx.status.progressed(len(records))
                    if replay is not None and replay.progress is not None:
                        replay.progress.update(batch.next_offsets())
                else:
                    try:
                        applied = await m.tick()
                    except Fenced as e:  # a batch still in flight (an overlapping endpoint) was fenced
                        ctx.log.warning("replaced by another worker, its batch in flight dropped: %s", e)
                        raise
                await self._committed(reader, applied, collections)
                if replay is not None and replay.stop_at_end is not None and await self._reached_end(reader):
                    await self._committed(reader, Applied(await self._rewind_gaps(m, reader)), collections,
                                          rewound=True)
                    ctx.log.info("replay reached its end offsets")
                    break
            failed = False
        finally:
            try:
                applied = await m.close(failed)
                if not failed:
                    await self._committed(reader, applied, collections)
            finally:
                await reader.stop()

    async def _apply(self, m: Materialization, reader: CollectionReader, batch: Batch) -> Applied | None:
        """``m.apply(batch)``; after ``Backpressure``, the same batch again later (its partitions paused
        meanwhile, so nothing more is fetched for them). None when the task stops while waiting."""
        backoff: Backoff | None = None
        paused: set[TopicPartition] = set()
        try:
            while True:
                try:
                    return await m.apply(batch)
                except Backpressure as e:
                    backoff = backoff or Backoff(initial=0.2, maximum=10.0)
                    delay = e.retry_after if e.retry_after is not None else backoff.next()
                    if not paused:
                        paused = {TopicPartition(r.topic, r.partition) for r in batch.records}
                        reader.pause(paused)
                    self.ctx.report(e)
                    self.ctx.log.info("the endpoint pushed back (%s): the batch of %d is applied again in %.1fs",
                                      e, len(batch.records), delay)
                    if not await self.ctx.sleep(delay):
                        return None
        finally:
            if paused:
                reader.resume(paused)

    def _assigned(self, m: Materialization):  # noqa: ANN202
        replay = self.ctx.replay

        async def on_assign(partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
            positions = await m.assigned(partitions)
            start = replay.start_offsets if replay is not None else {}
            stop = replay.stop_at_end if replay is not None else None
            ahead: dict[TopicPartition, int] = {}
            for tp in partitions & start.keys():
                stored = positions.get(tp)
                positions[tp] = start[tp]
                if stop is not None and tp in stop and stored is not None and stored > stop[tp]:
                    ahead[tp] = stored
            if ahead:
                ends = await _ends(self.ctx.kafka, sorted(ahead))
                for tp, stored in ahead.items():
                    if stored <= ends[tp]:
                        stop[tp] = stored  # type: ignore[index]
                    else:
                        self._gaps[tp] = ends[tp]
                        self.ctx.log.warning("stored offset %d of %s[%d] is beyond the partition's end %d (a gap): "
                                             "the replay ends at the partition's end", stored, tp.topic,
                                             tp.partition, ends[tp])
            if replay is not None and replay.progress is not None:
                replay.progress.update({tp: positions.get(tp) or 0 for tp in partitions})
            for tp in partitions:  # what the connector may say is durable starts over from here
                at = positions.get(tp)
                self._floor.pop(tp, None)
                self._read.pop(tp, None)
                if at is not None:
                    self._floor[tp] = self._read[tp] = at
            self._ever_assigned = True
            self.ctx.log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]@{positions.get(tp) or 0}"
                                                        for tp in sorted(partitions)))
            return positions

        return on_assign

    async def _reached_end(self, reader: CollectionReader) -> bool:
        """True once this worker holds no ``stop_at_end`` partition that is not read to its offset.

        A worker that holds nothing is in a rebalance (its partitions were revoked and come back
        in the next generation), not done: it waits, and gives up only after ``HOLD_NOTHING_FOR``
        seconds without a partition (the group's other workers hold them all).
        """
        reader.raise_failure()  # an assignment that failed never seeked: its positions are not progress
        if not self._ever_assigned or reader.settling:
            return False
        stop: Offsets = self.ctx.replay.stop_at_end  # type: ignore[union-attr, assignment]
        held = reader.assignment()
        if not held:
            now = time.monotonic()
            self._empty_since = self._empty_since or now
            if now - self._empty_since < HOLD_NOTHING_FOR:
                return False
            self.ctx.log.warning("holds no partition for %.0fs after a rebalance: the group's other workers "
                                 "hold them all", now - self._empty_since)
            return True
        self._empty_since = None
        for tp in held:
            if tp in stop and await reader.position(tp) < stop[tp]:
                return False
        return True

    async def _rewind_gaps(self, m: Materialization, reader: CollectionReader) -> Offsets:
        """At a replay's end: partitions past a gap that no applied batch moved back, rewound to their end."""
        held = reader.assignment()
        gaps = {tp: end for tp, end in self._gaps.items() if tp in held}
        if not gaps:
            return {}
        try:
            durable = await m.rewind(gaps)
        except NotImplementedError:
            self.ctx.log.warning("connector %s cannot move a stored offset back past a gap: %s still stored "
                                 "beyond the end", self.ctx.spec.connector,
                                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(gaps)))
            return {}
        self.ctx.log.info("stored offsets rewound to the partitions' ends past the gap: %s",
                          ", ".join(f"{tp.topic}[{tp.partition}]@{n}" for tp, n in sorted(durable.items())))
        return durable

    async def _committed(self, reader: CollectionReader, applied: Applied, collections: list[Collection], *,
                         rewound: bool = False) -> None:
        """Count what the connector applied, check the offsets it says are durable, commit them."""
        if not isinstance(applied, Applied):
            raise ImplementationError(f"{self.ctx.spec.connector} returned {type(applied).__name__} from apply, "
                                      "tick or close: return an Applied (pipeline/sdk/materialization.py)")
        for binding, count in applied.documents.items():
            if count:
                metrics.DOCS_OUT.labels(self.ctx.name, collections[binding].name).inc(count)
        for binding, size in applied.stored_bytes.items():
            if size:
                metrics.ARCHIVE_BYTES.labels(self.ctx.name, collections[binding].name).inc(size)
        durable = applied.offsets
        if not durable:
            return
        if rewound:  # moved back past a gap on purpose: the new floor
            self._floor.update(durable)
        else:
            self._check(durable)
        for tp in durable:
            self._gaps.pop(tp, None)
        start = self.ctx.replay.start_offsets if self.ctx.replay is not None else None
        if start:
            for tp in durable:
                start.pop(tp, None)
        metrics.checkpointed(self.ctx.name)
        try:
            await reader.commit(durable)
        except EndpointError as e:  # advisory only (the endpoint holds the checkpoint): never fail for it
            self.ctx.log.debug("advisory offset commit skipped: %s", e)

    def _check(self, durable: Offsets) -> None:
        """Offsets a connector says are durable lie between where it resumed (or what it made durable
        before) and what it was given; else its checkpoint is wrong, and committing it would skip or
        repeat records."""
        for tp, offset in durable.items():
            floor, read = self._floor.get(tp), self._read.get(tp)
            where = f"{self.ctx.spec.connector} ({self.ctx.name}) says offset {offset} of {tp.topic}[{tp.partition}]"
            if floor is not None and offset < floor:
                raise ImplementationError(f"{where} is durable, which went back from {floor}: durable offsets "
                                          "never go backwards (pipeline/sdk/materialization.py)")
            if read is None or offset > read:
                raise ImplementationError(f"{where} is durable, beyond the batch: it was given records up to "
                                          f"offset {'nothing' if read is None else read - 1} of that partition")
            self._floor[tp] = offset

    def _latency(self, records: list[Record], collections: list[Collection]) -> None:
        """Document timestamp (else Kafka record time) to now, sampled on each batch's last record."""
        last = records[-1]
        born = last.timestamp_ms / 1000
        stamp = last.doc.get("timestamp") if isinstance(last.doc, dict) else None
        if isinstance(stamp, str):
            with contextlib.suppress(ValueError):
                born = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        name = next((c.name for c in collections if c.topic == last.topic), last.topic)
        metrics.END_TO_END.labels(self.ctx.name, name).observe(max(0.0, time.time() - born))


async def _ends(kafka: Any, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    from pipeline.runtime.offsets import high_watermarks, probe_consumer

    async with probe_consumer(kafka) as consumer:
        return await high_watermarks(consumer, tps)
