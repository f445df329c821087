"""The runtime task that feeds a materialization from Kafka (its contract: pipeline/sdk/materialization.py).

A materialization keeps its own checkpoint (next offset per partition) *in its endpoint*,
committed with the data: Postgres in the same transaction, Redis in the same MULTI/EXEC, S3
in the object names. Several workers of one materialization share its partitions through a
consumer group (``localflow.<task>``); on assignment the runtime asks the connector where each
partition resumes, and seeks there. Kafka's committed group offsets are advisory only (for
lag in `localflow status`), never the source of truth.

Runtime options (``TaskContext.options``) that `localflow replay` sets to backfill an endpoint:

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
from pipeline.sdk.errors import EndpointError, Fenced
from pipeline.sdk.materialization import Batch, Materialization, Offsets
from pipeline.sdk.records import Record
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

    async def run(self) -> None:
        from pipeline.runtime.registry import load_connector

        ctx = self.ctx
        spec: MaterializationSpec = ctx.spec
        collections: list[Collection] = [ctx.collection(b.source) for b in spec.bindings]
        bindings = {c.topic: i for i, c in enumerate(collections)}
        m: Materialization = load_connector(spec.connector).build(ctx)
        await m.open()
        ctx.status.connected = True
        reader = CollectionReader(ctx.kafka, f"localflow.{ctx.name}", collections,
                                  on_assign=self._assigned(m), on_revoke=m.revoked,
                                  options=ReaderOptions(**ctx.options.get("reader", {})), task=ctx.name)
        await reader.start()
        failed = True
        try:
            while not ctx.stopping.is_set():
                records = await reader.batch(timeout_ms=self.poll_ms)
                if records:
                    started = time.perf_counter()
                    batch = Batch(records, bindings)
                    try:
                        durable = await m.apply(batch)
                    except Fenced as e:
                        ctx.log.warning("replaced by another worker, batch of %d dropped: %s", len(records), e)
                        raise
                    metrics.BATCH_SIZE.labels(ctx.name).observe(len(records))
                    metrics.BATCH_SECONDS.labels(ctx.name).observe(time.perf_counter() - started)
                    self._latency(records, collections)
                    ctx.status.progressed(len(records))
                    if "progress" in ctx.options:
                        ctx.options["progress"].update(batch.next_offsets())
                else:
                    durable = await m.tick()
                await self._committed(reader, durable)
                if "stop_at_end" in ctx.options and await self._reached_end(reader):
                    await self._committed(reader, await self._rewind_gaps(m, reader))
                    ctx.log.info("replay reached its end offsets")
                    break
            failed = False
        finally:
            try:
                durable = await m.close(failed)
                if not failed:
                    await self._committed(reader, durable)
            finally:
                await reader.stop()

    def _assigned(self, m: Materialization):  # noqa: ANN202
        options = self.ctx.options

        async def on_assign(partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
            positions = await m.assigned(partitions)
            start, stop = options.get("start_offsets", {}), options.get("stop_at_end")
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
            if "progress" in options:
                options["progress"].update({tp: positions.get(tp) or 0 for tp in partitions})
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
        stop: Offsets = self.ctx.options["stop_at_end"]
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

    async def _committed(self, reader: CollectionReader, durable: Offsets) -> None:
        if not durable:
            return
        for tp in durable:
            self._gaps.pop(tp, None)
        start = self.ctx.options.get("start_offsets")
        if start:
            for tp in durable:
                start.pop(tp, None)
        metrics.checkpointed(self.ctx.name)
        try:
            await reader.commit(durable)
        except EndpointError as e:  # advisory only (the endpoint holds the checkpoint): never fail for it
            self.ctx.log.debug("advisory offset commit skipped: %s", e)

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
