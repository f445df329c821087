"""`localflow preview`: print a collection's documents as JSON lines (like `vector tap`).

It reads without a consumer group, so it never moves any task's checkpoint. Without
``--from-beginning`` it starts at each partition's current end, read from a fetch response
(the only "latest offset" every broker reports right), and waits for new documents.
"""

from __future__ import annotations

import asyncio
import sys
from typing import BinaryIO

import orjson
from aiokafka.errors import KafkaError

from pipeline.catalog import Catalog
from pipeline.collection import Collection
from pipeline.errors import ConfigError, EndpointError
from pipeline.offsets import beginning_offsets, high_watermarks, partitions_of, probe_consumer


async def preview(catalog: Catalog, collection: str, *, limit: int | None, follow: bool, from_beginning: bool,
                  out: BinaryIO, stopping: asyncio.Event | None = None) -> int:
    """Write documents to ``out``, one JSON object per line; return how many were written.

    Stops after ``limit`` documents; with ``from_beginning`` and without ``follow``, at the
    end each partition had when preview started; otherwise when ``stopping`` is set.
    """
    if collection not in catalog.collections:
        raise ConfigError(f"{collection!r} is not a collection of the catalog; collections: "
                          f"{', '.join(sorted(catalog.collections))}", "COLLECTION")
    topic = Collection.from_catalog(catalog, collection).topic
    stopping = stopping or asyncio.Event()
    written = 0
    async with probe_consumer(catalog.kafka, partition_fetch_bytes=1024 * 1024) as consumer:
        tps = await partitions_of(consumer, topic)
        if not tps:
            raise ConfigError(f"collection {collection} has no topic {topic} on {catalog.kafka.bootstrap_servers} yet "
                              f"(nothing was written to it)", "COLLECTION")
        ends = await high_watermarks(consumer, tps)
        starts = await beginning_offsets(consumer, tps) if from_beginning else ends
        for tp in tps:
            consumer.seek(tp, starts[tp])
        if not from_beginning:
            print(f"waiting for new documents of {collection} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        until = ends if from_beginning and not follow else None
        pending = {tp for tp in tps if until is None or starts[tp] < until[tp]}
        while pending and not stopping.is_set() and (limit is None or written < limit):
            try:
                batch = await consumer.getmany(timeout_ms=200, max_records=limit - written if limit else 1000)
            except KafkaError as e:
                raise EndpointError(f"Kafka at {catalog.kafka.bootstrap_servers}: fetch failed: {e!r}") from e
            for tp, messages in batch.items():
                for m in messages:
                    if until is not None and m.offset >= until[tp]:
                        break
                    line = _line(m.value)
                    if line:
                        out.write(line)
                        written += 1
            out.flush()
            if until is not None:
                pending = {tp for tp in pending if await consumer.position(tp) < until[tp]}
    return written


def _line(value: bytes | None) -> bytes:
    """The document re-serialized on one line; a value that is not JSON is shown as a string."""
    try:
        return orjson.dumps(orjson.loads(value or b"null")) + b"\n"
    except orjson.JSONDecodeError:
        print(f"(not JSON: {value[:80]!r})", file=sys.stderr)
        return b""
