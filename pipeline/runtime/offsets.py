"""Where partitions begin and end, and which offset a time falls at, on any Kafka broker.

Only requests every broker answers correctly are used: ListOffsets *earliest* (beginning
offsets) and Fetch (whose response carries the high watermark). Some brokers answer
ListOffsets *latest* and ``offsets_for_times`` wrongly (Tansu: always 0), so the end of a
partition is read from a fetch response and a time is found by binary search over the
timestamps of the records themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.runtime.catalog import KafkaConfig
from pipeline.sdk.errors import EndpointError


@asynccontextmanager
async def probe_consumer(kafka: KafkaConfig, group_id: str | None = None, *,
                         partition_fetch_bytes: int = 64 * 1024) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer for small reads: short fetch waits, no auto commit, never joins a group.

    With ``group_id`` it can read the group's committed offsets (``committed``) without
    joining it: only ``subscribe`` joins, and this consumer is only ever ``assign``-ed.
    """
    consumer = AIOKafkaConsumer(**kafka.client_options(), group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=100,
                                max_partition_fetch_bytes=partition_fetch_bytes, isolation_level="read_uncommitted")
    try:
        await consumer.start()
    except KafkaError as e:
        await consumer.stop()
        raise EndpointError(f"Kafka at {kafka.bootstrap_servers}: cannot start a consumer: {e!r}") from e
    await asyncio.sleep(0)  # let its background tasks start: stopping before they ran raises CancelledError
    try:
        yield consumer
    finally:
        await consumer.stop()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """The topic's partitions ([] when the topic does not exist)."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer._client.force_metadata_update()  # noqa: SLF001 - first sight of the topic
        parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


async def high_watermarks(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
                          timeout: float = 10.0) -> dict[TopicPartition, int]:  # noqa: ASYNC109
    """The end of each partition (the offset the next record will get), from a fetch response.

    Assigns ``tps`` to ``consumer`` and moves its positions: callers seek afterwards.
    """
    if not tps:
        return {}
    consumer.assign(list(tps))
    begin = await beginning_offsets(consumer, tps)
    for tp in tps:
        consumer.seek(tp, begin[tp])
    deadline = time.monotonic() + timeout
    while any(consumer.highwater(tp) is None for tp in tps):
        if time.monotonic() > deadline:
            missing = [f"{tp.topic}[{tp.partition}]" for tp in tps if consumer.highwater(tp) is None]
            raise EndpointError(f"Kafka: no fetch answer for {', '.join(missing)} within {timeout:.0f}s")
        try:
            await consumer.getmany(*tps, timeout_ms=100, max_records=1)
        except KafkaError as e:
            raise EndpointError(f"Kafka: fetch failed while reading partition ends: {e!r}") from e
    return {tp: consumer.highwater(tp) for tp in tps}  # type: ignore[misc]


async def beginning_offsets(consumer: AIOKafkaConsumer, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
    try:
        return await consumer.beginning_offsets(list(tps))
    except KafkaError as e:
        raise EndpointError(f"Kafka: cannot read the beginning offsets: {e!r}") from e


async def offset_for_time(consumer: AIOKafkaConsumer, tp: TopicPartition, timestamp_ms: int,
                          begin: int, end: int, timeout: float = 10.0) -> int:  # noqa: ASYNC109
    """Where to start reading ``tp`` to get its records timestamped at or after ``timestamp_ms``:
    the first such record's offset, or one equivalent to it (offsets without records before it
    read as nothing), or ``end`` when there is none. Binary search: each probe seeks and
    fetches one record, so a partition of a million records takes about 20 fetches.

    Timestamps are assumed to grow with offsets (producer or broker time); where they do not,
    the answer is still a record at or after the time, not necessarily the first one.
    ``tp`` must be assigned to ``consumer``.
    """
    lo, hi = begin, end
    while lo < hi:
        mid = (lo + hi) // 2
        record = await _record_at_or_after(consumer, tp, mid, end, timeout)
        if record is None or record[1] >= timestamp_ms:
            hi = mid  # reading from mid yields that record first (or nothing before the end)
        else:
            lo = record[0] + 1
    return lo


async def _record_at_or_after(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, end: int,
                              timeout: float) -> tuple[int, int] | None:  # noqa: ASYNC109
    """(offset, timestamp ms) of the first record at or after ``offset`` and before ``end``."""
    if offset >= end:
        return None
    consumer.seek(tp, offset)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = await consumer.getmany(tp, timeout_ms=200, max_records=1)
        except KafkaError as e:
            raise EndpointError(f"Kafka: fetch of {tp.topic}[{tp.partition}]@{offset} failed: {e!r}") from e
        for message in got.get(tp, []):
            return (message.offset, message.timestamp) if message.offset < end else None
        if await consumer.position(tp) >= end:
            return None
    raise EndpointError(f"Kafka: no record of {tp.topic}[{tp.partition}] at or after offset {offset} "
                        f"within {timeout:.0f}s (end {end})")
