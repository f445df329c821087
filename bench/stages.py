"""Throughput of each stage, and of its ceiling: a raw client doing the same work on the same data.

Repetitions alternate (localflow, ceiling, localflow, ...) so that the noise of a shared machine
falls on both sides alike; every repetition uses fresh topics, tables, keys and task names.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis

from bench.common import RAW_KEY, RAW_SCHEMA, Meter, Row, Sample, chunks, ratio_row, sophia_data, sophia_docs
from bench.harness import PG_SCHEMA, Bench, BenchError, Source, documents_done, pg_ident, pg_table
from pipeline.runtime.catalog import topic_of
from pipeline.runtime.collection import Collection, CollectionReader, CollectionWriter, ReaderOptions
from pipeline.runtime.task import ReplayPlan

WRITE_BATCH = 2_000
"""Documents per write call: what a capture hands the writer at once (the files capture's batch_lines)."""
FETCH_RECORDS = 10_000
"""Records per poll, as localflow's reader fetches them."""
MB = 1_000_000


Side = Callable[[int], Awaitable[Sample]]
"""One side of a stage: runs repetition ``i`` and returns its sample."""


async def alternate(reps: int, *sides: Side) -> list[list[Sample]]:
    """Repetitions, each side in turn each time (localflow first), after freezing what the benchmark holds.

    ``gc.freeze()`` moves the test data (100,000 documents and their bytes) out of the garbage
    collector's sight: otherwise every full collection triggered by the run would scan them,
    a cost a worker process, which holds one batch at a time, does not have.
    """
    out: list[list[Sample]] = [[] for _ in sides]
    for rep in range(reps):
        for side, samples in zip(sides, out, strict=True):
            gc.collect()
            gc.freeze()
            samples.append(await side(rep))
    return out


# ---------------------------------------------------------------------------- collection write


async def collection_write(b: Bench) -> Row:
    """CollectionWriter (validation, keys, serialization, acks) vs a producer sending the same bytes."""
    n = b.sizes.docs
    docs = sophia_docs(n)

    async def localflow(rep: int) -> Sample:
        coll = Collection(f"bench/{b.name('write')}", RAW_SCHEMA, RAW_KEY, partitions=3)
        async with CollectionWriter(b.kafka, "bench") as writer:
            await writer.ensure([coll])
            with b.profiled("collection write"), Meter() as meter:
                for chunk in chunks(docs, WRITE_BATCH):
                    await writer.write(coll, chunk)
        await _expect_messages(b, coll.topic, n)
        return meter.sample(n)

    async def ceiling(rep: int) -> Sample:
        coll = Collection(f"bench/{b.name('write')}", RAW_SCHEMA, RAW_KEY, partitions=3)
        await b.create_topic(coll.topic, 3)
        pairs = [coll.encode(d) for d in docs]
        headers = coll.headers("bench")
        producer = b.producer()
        await producer.start()
        try:
            with Meter() as meter:
                for chunk in chunks(pairs, WRITE_BATCH):
                    futures = [await producer.send(coll.topic, v, key=k, headers=headers) for k, v in chunk]
                    await asyncio.gather(*futures)
        finally:
            await producer.stop()
        await _expect_messages(b, coll.topic, n)
        return meter.sample(n)

    lf, ce = await alternate(b.sizes.reps, localflow, ceiling)
    return ratio_row("collection write", "docs/s", lf, ce, 0.8,
                     f"write() calls of {WRITE_BATCH} documents, each waiting for its acks (acks=all); "
                     "the ceiling sends the writer's bytes and headers the same way")


# ---------------------------------------------------------------------------- collection read


async def collection_read(b: Bench) -> Row:
    """CollectionReader batches (decoded documents) vs getmany of the same records: no target, it
    explains the stages that read Kafka (derivation, postgres, redis, s3)."""
    src = await b.source()
    n = src.n
    tps = [TopicPartition(src.topic, p) for p in range(src.partitions)]

    async def localflow(rep: int) -> Sample:
        coll = Collection(src.collection, RAW_SCHEMA, RAW_KEY, src.partitions)
        reader = CollectionReader(b.kafka, None, [coll])
        await reader.start(tps)
        try:
            await reader.consumer.seek_to_beginning(*tps)
            seen = 0
            with b.profiled("collection read"), Meter() as meter:
                while seen < n:
                    seen += len(await reader.batch(timeout_ms=200))
        finally:
            await reader.stop()
        return meter.sample(n)

    async def ceiling(rep: int) -> Sample:
        async with _raw_consumer(b, tps) as consumer:
            seen = 0
            with Meter() as meter:
                while seen < n:
                    fetched = await consumer.getmany(timeout_ms=200, max_records=FETCH_RECORDS)
                    seen += sum(map(len, fetched.values()))
        return meter.sample(n)

    lf, ce = await alternate(b.sizes.reps, localflow, ceiling)
    return ratio_row("collection read", "docs/s", lf, ce, None,
                     "no target: every stage that reads Kafka pays this; the reader decodes each document "
                     "(orjson) into a Record")


@contextlib.asynccontextmanager
async def _raw_consumer(b: Bench, tps: list[TopicPartition]) -> AsyncIterator[AIOKafkaConsumer]:
    """A group-less consumer with the fetch sizes of localflow's reader, at the start of ``tps``."""
    o = ReaderOptions()
    consumer = AIOKafkaConsumer(**b.kafka.client_options(), enable_auto_commit=False,
                                fetch_max_bytes=o.fetch_max_bytes, max_partition_fetch_bytes=o.max_partition_fetch_bytes)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        yield consumer
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------- derivation


async def derivation(b: Bench) -> Row:
    """The Sophia SQL derivation vs consume + produce passthrough of the same records (target 0.8)."""
    src = await b.source()
    n = src.n
    sophia = b.sophia.collections["sophia/sophia_processed_data"]
    assert sophia.derive is not None
    derive = sophia.derive.model_dump(by_alias=True)
    derive["transforms"] = [{**t, "source": src.collection} for t in derive["transforms"]]
    schema = b.sophia.schema("sophia/sophia_processed_data")

    async def localflow(rep: int) -> Sample:
        derived = src.collection.rsplit("/", 1)[0] + f"/{b.name('processed')}"
        cat = b.catalog({"collections": {
            src.collection: b.raw_collection(src.partitions),
            derived: {"schema": schema, "key": sophia.key, "partitions": 3, "derive": derive},
        }})
        timed = await b.run_task(cat, derived, done=documents_done(derived, n))
        await _expect_messages(b, topic_of(derived), n)
        return timed.sample(n)

    async def ceiling(rep: int) -> Sample:
        out = f"bench.{b.name('passthrough')}"
        await b.create_topic(out, 3)
        producer = b.producer()
        await producer.start()
        try:
            async with _raw_consumer(b, [TopicPartition(src.topic, p) for p in range(src.partitions)]) as consumer:
                seen = 0
                with Meter() as meter:
                    while seen < n:
                        fetched = await consumer.getmany(timeout_ms=200, max_records=FETCH_RECORDS)
                        futures = []
                        for messages in fetched.values():
                            for m in messages:
                                futures.append(await producer.send(out, m.value, key=m.key))
                            seen += len(messages)
                        await asyncio.gather(*futures)
        finally:
            await producer.stop()
        await _expect_messages(b, out, n)
        return meter.sample(n)

    lf, ce = await alternate(b.sizes.reps, localflow, ceiling)
    return ratio_row("derivation", "docs/s", lf, ce, 0.8,
                     "sophia/sophia_processed_data's SQL from examples/sophia/flow.yaml, sqlite engine; "
                     "outputs acknowledged before input offsets are committed, as in the worker")


# ---------------------------------------------------------------------------- postgres


PG_COLUMNS = ("metadata/id", "timestamp", "source", "data", "metadata", "flow_published_at", "flow_document")
"""The columns of the raw collection's table, as the postgres connector makes it."""


async def postgres(b: Bench) -> list[Row]:
    """Kafka -> table exactly once, vs a user's own consumer (consume + COPY + upsert) and, as an
    extra row, vs COPY + upsert of rows already in memory (no Kafka).

    Both ceilings write into a copy (``LIKE ... INCLUDING ALL``) of the table localflow just made,
    so every side writes the same rows into the same kind of table.
    """
    src = await b.source()
    n = src.n
    conn = await asyncpg.connect(b.services.postgres.url)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {pg_ident(PG_SCHEMA)}")
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=lambda v: b"\x01" + v, decoder=lambda v: v[1:])
    rows = pg_rows(src)
    made: list[str] = []  # tables localflow made, for the ceilings to copy
    tps = [TopicPartition(src.topic, p) for p in range(src.partitions)]

    async def localflow(rep: int) -> Sample:
        task, table = f"bench/{b.name('pg')}", b.name("pg")
        cat = b.catalog({
            "collections": {src.collection: b.raw_collection(src.partitions)},
            "materializations": {task: {
                "endpoint": {"postgres": {"url": "${POSTGRES_URL}", "schema": PG_SCHEMA}},
                "bindings": [{"source": src.collection, "resource": {"table": table}}],
            }},
        })
        timed = await b.run_task(cat, task, replay=ReplayPlan(stop_at_end=src.ends()))
        await _expect_rows(conn, table, n)
        made.append(table)
        return timed.sample(n)

    async def copy_of_made(what: str) -> tuple[str, str]:
        table, load = pg_table(b.name(what)), b.name("pg_load")
        await conn.execute(f"CREATE TABLE {table} (LIKE {pg_table(made[-1])} INCLUDING ALL)")
        return table, load

    async def kafka_ceiling(rep: int) -> Sample:
        """What a user would write: consume, COPY the JSON bytes, let Postgres extract the columns
        and upsert; one transaction per fetch, no checkpoint."""
        table, load = await copy_of_made("pg_fair")
        await conn.execute(f"CREATE TEMPORARY TABLE {pg_ident(load)} (ms bigint, doc jsonb) ON COMMIT DELETE ROWS")
        names = ", ".join(map(pg_ident, PG_COLUMNS))
        updates = ", ".join(f"{pg_ident(c)} = EXCLUDED.{pg_ident(c)}" for c in PG_COLUMNS[1:])
        upsert = (f"INSERT INTO {table} ({names}) SELECT doc->'metadata'->>'id', (doc->>'timestamp')::timestamptz, "
                  f"doc->>'source', doc->'data', doc->'metadata', to_timestamp(ms / 1000.0), doc "
                  f"FROM {pg_ident(load)} ON CONFLICT ({pg_ident(PG_COLUMNS[0])}) DO UPDATE SET {updates}")
        async with _raw_consumer(b, tps) as consumer:
            seen = 0
            with Meter() as meter:
                while seen < n:
                    fetched = await consumer.getmany(timeout_ms=200, max_records=FETCH_RECORDS)
                    records = [(m.timestamp, m.value) for ms in fetched.values() for m in ms]
                    if not records:
                        continue
                    async with conn.transaction():
                        await conn.copy_records_to_table(load, records=records, columns=("ms", "doc"))
                        await conn.execute(upsert)
                    seen += len(records)
        await _expect_rows(conn, table, n, qualified=True)
        return meter.sample(n)

    async def memory_ceiling(rep: int) -> Sample:
        table, load = await copy_of_made("pg_ceiling")
        await conn.execute(f"CREATE TEMPORARY TABLE {pg_ident(load)} (LIKE {table}) ON COMMIT DELETE ROWS")
        names = ", ".join(map(pg_ident, PG_COLUMNS))
        updates = ", ".join(f"{pg_ident(c)} = EXCLUDED.{pg_ident(c)}" for c in PG_COLUMNS[1:])
        upsert = (f"INSERT INTO {table} ({names}) SELECT {names} FROM {pg_ident(load)} "
                  f"ON CONFLICT ({pg_ident(PG_COLUMNS[0])}) DO UPDATE SET {updates}")
        with Meter() as meter:
            for chunk in chunks(rows, FETCH_RECORDS):
                async with conn.transaction():
                    await conn.copy_records_to_table(load, records=chunk, columns=PG_COLUMNS)
                    await conn.execute(upsert)
        await _expect_rows(conn, table, n, qualified=True)
        return meter.sample(n)

    try:
        lf, fair, memory = await alternate(b.sizes.reps, localflow, kafka_ceiling, memory_ceiling)
    finally:
        for table in made:
            await conn.execute(f"DROP TABLE IF EXISTS {pg_table(table)}")
        await conn.close()
    return [ratio_row("postgres", "docs/s", lf, fair, 0.8,
                      f"fresh table, every key new; the ceiling consumes the same records ({FETCH_RECORDS} per "
                      "fetch), COPYs their bytes and upserts with the columns extracted by Postgres, one "
                      "transaction per fetch, no checkpoint"),
            ratio_row("postgres (vs no-Kafka ceiling)", "docs/s", lf, memory, None,
                      f"extra row: the ceiling COPYs rows already typed in Python, {FETCH_RECORDS} per "
                      "transaction, with no Kafka and no checkpoint")]


def pg_rows(src: Source) -> list[tuple[Any, ...]]:
    """The raw table's rows (``PG_COLUMNS``) as a client would COPY them: typed, jsonb as JSON bytes."""
    published = datetime.now(UTC)
    rows = []
    for doc, value in zip(src.docs, src.values, strict=True):
        ts = datetime.fromisoformat(doc["timestamp"].replace("Z", "+00:00"))
        rows.append((doc["metadata"]["id"], ts, doc["source"], orjson.dumps(doc["data"]),
                     orjson.dumps(doc["metadata"]), published, value))
    return rows


async def _expect_rows(conn: asyncpg.Connection, table: str, n: int, *, qualified: bool = False) -> None:
    """Count the table's rows; a ceiling's table is dropped once counted."""
    name = table if qualified else pg_table(table)
    count = await conn.fetchval(f"SELECT count(*) FROM {name}")
    if qualified:
        await conn.execute(f"DROP TABLE {name}")
    if count != n:
        raise BenchError(f"Postgres table {name} has {count} rows, expected {n}")


# ---------------------------------------------------------------------------- redis


async def redis(b: Bench) -> Row:
    """Kafka -> latest value per key vs pipelined SET of the same key/value pairs."""
    src = await b.source()
    n = src.n
    client = Redis.from_url(b.services.redis.url)

    async def localflow(rep: int) -> Sample:
        task, prefix = f"bench/{b.name('redis')}", b.name("r")
        cat = b.catalog({
            "collections": {src.collection: b.raw_collection(src.partitions)},
            "materializations": {task: {
                "endpoint": {"redis": {"url": "${REDIS_URL}"}},
                "bindings": [{"source": src.collection, "resource": {"key": prefix + ":{/metadata/id}"}}],
            }},
        })
        timed = await b.run_task(cat, task, replay=ReplayPlan(stop_at_end=src.ends()))
        await _expect_keys(client, prefix, n, also=f"localflow:pos:{prefix}:")
        return timed.sample(n)

    async def ceiling(rep: int) -> Sample:
        prefix = b.name("r")
        pairs = [(f"{prefix}:{d['metadata']['id']}", v) for d, v in zip(src.docs, src.values, strict=True)]
        with Meter() as meter:
            for chunk in chunks(pairs, 1000):
                pipe = client.pipeline(transaction=False)
                for k, v in chunk:
                    pipe.set(k, v)
                await pipe.execute()
        await _expect_keys(client, prefix, n)
        return meter.sample(n)

    try:
        lf, ce = await alternate(b.sizes.reps, localflow, ceiling)
    finally:
        await client.aclose()
    return ratio_row("redis", "docs/s", lf, ce, 0.8,
                     "JSON values; localflow's script also keeps each key's Kafka position and the "
                     "checkpoint atomically; the ceiling pipelines 1000 SETs per round trip")


async def _expect_keys(client: Redis, prefix: str, n: int, also: str | None = None) -> None:
    """Count ``prefix:*`` keys, then delete them (and ``also*``) so Redis stays small."""
    count = 0
    for pattern in [f"{prefix}:*", *([f"{also}*"] if also else [])]:
        keys = {key async for key in client.scan_iter(match=pattern, count=10_000)}  # SCAN may repeat keys
        if pattern.startswith(prefix):
            count = len(keys)
        for chunk in chunks(list(keys), 10_000):
            await client.unlink(*chunk)
    if count != n:
        raise BenchError(f"Redis holds {count} keys {prefix}:*, expected {n}")


# ---------------------------------------------------------------------------- s3


async def s3(b: Bench) -> list[Row]:
    """Kafka -> JSON-lines objects vs consume + put_object of the same bytes, and (extra row) vs
    put_object of the same objects from memory (MB/s of JSON lines)."""
    src = await b.source()
    n = src.n
    size = src.bytes + n  # JSON lines: one newline per document
    bucket = b.name("bench").replace("_", "-")
    session = aioboto3.Session(aws_access_key_id=b.env["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=b.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    endpoint = b.services.s3.endpoint_url
    max_documents = 10_000

    async def localflow(rep: int) -> Sample:
        task, prefix = f"bench/{b.name('s3')}", b.name("s3") + "/"
        cat = b.catalog({
            "collections": {src.collection: b.raw_collection(src.partitions)},
            "materializations": {task: {
                "endpoint": {"s3": {"bucket": bucket, "endpoint_url": "${S3_ENDPOINT_URL}", "create_bucket": True,
                                    "aws_access_key_id": "${AWS_ACCESS_KEY_ID}",
                                    "aws_secret_access_key": "${AWS_SECRET_ACCESS_KEY}"}},
                "bindings": [{"source": src.collection, "resource": {
                    "prefix": prefix, "compression": "none", "max_documents": max_documents}}],
            }},
        })
        timed = await b.run_task(cat, task, replay=ReplayPlan(stop_at_end=src.ends()))
        await _expect_objects(s3c, bucket, prefix + src.collection + "/", size)
        return timed.sample(size / MB, n)

    async def kafka_ceiling(rep: int) -> Sample:
        """What a user would write: consume, and put each partition's lines as an object every
        ``max_documents`` (partitions side by side: each upload runs while the next fetch does)."""
        prefix = b.name("s3k")
        lines: dict[int, list[bytes]] = defaultdict(list)
        parts: dict[int, int] = defaultdict(int)
        uploads: list[asyncio.Task[Any]] = []

        def put(p: int, body: list[bytes]) -> None:
            key = f"{prefix}/p={p}/{parts[p]:06d}.jsonl"
            parts[p] += 1
            uploads.append(asyncio.create_task(s3c.put_object(
                Bucket=bucket, Key=key, Body=b"\n".join(body) + b"\n", ContentType="application/x-ndjson")))

        async with _raw_consumer(b, [TopicPartition(src.topic, p) for p in range(src.partitions)]) as consumer:
            seen = 0
            with Meter() as meter:
                while seen < n:
                    fetched = await consumer.getmany(timeout_ms=200, max_records=FETCH_RECORDS)
                    for tp, messages in fetched.items():
                        pending = lines[tp.partition]
                        pending += [m.value for m in messages]
                        seen += len(messages)
                        while len(pending) >= max_documents:
                            put(tp.partition, pending[:max_documents])
                            del pending[:max_documents]
                for p, pending in lines.items():
                    if pending:
                        put(p, pending)
                await asyncio.gather(*uploads)
        await _expect_objects(s3c, bucket, prefix + "/", size)
        return meter.sample(size / MB, n)

    async def memory_ceiling(rep: int) -> Sample:
        prefix = b.name("s3c")
        by_partition: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        for (p, o), v in zip(src.placement, src.values, strict=True):
            by_partition[p].append((o, v))
        bodies = {p: [b"\n".join(v for _, v in part) + b"\n" for part in chunks(sorted(lines), max_documents)]
                  for p, lines in by_partition.items()}

        async def put(p: int) -> None:
            for i, body in enumerate(bodies[p]):
                await s3c.put_object(Bucket=bucket, Key=f"{prefix}/p={p}/{i:06d}.jsonl", Body=body,
                                     ContentType="application/x-ndjson")

        with Meter() as meter:
            await asyncio.gather(*(put(p) for p in bodies))
        await _expect_objects(s3c, bucket, prefix + "/", size)
        return meter.sample(size / MB, n)

    async with session.client("s3", endpoint_url=endpoint) as s3c:
        lf, fair, memory = await alternate(b.sizes.reps, localflow, kafka_ceiling, memory_ceiling)
    return [ratio_row("s3", "MB/s", lf, fair, 0.8,
                      f"uncompressed JSON lines, objects of {max_documents} documents per partition; the ceiling "
                      "consumes the same records and puts each partition's bytes as they fill an object, "
                      "without the connector's owner check and marker update per object"),
            ratio_row("s3 (vs no-Kafka ceiling)", "MB/s", lf, memory, None,
                      "extra row: the ceiling puts the same objects from memory, partitions side by side")]


async def _expect_objects(s3c: Any, bucket: str, prefix: str, size: int) -> None:
    total = 0
    async for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    if total != size:
        raise BenchError(f"S3 objects under s3://{bucket}/{prefix} hold {total} bytes, expected {size}")


# ---------------------------------------------------------------------------- file capture


def log_lines(n: int, seed: int = 11) -> bytes:
    """``n`` JSON log lines of a Sophia agent (about 270 bytes each; documents about 400)."""
    rng = random.Random(seed)
    base = 1_795_000_000.0
    out = []
    for i in range(n):
        line = {"timestamp": datetime.fromtimestamp(base + i / 1000, UTC).isoformat().replace("+00:00", "Z"),
                "level": "info", **sophia_data(i, rng)}
        out.append(orjson.dumps(line))
    return b"\n".join(out) + b"\n"


async def file_capture(b: Bench) -> Row:
    """files capture (tail, parse, document, write, checkpoint) vs reading lines and producing them raw."""
    n = b.sizes.docs
    directory = b.workdir / b.name("logs")
    directory.mkdir()
    path = directory / "agent.jsonl"
    path.write_bytes(log_lines(n))
    size = path.stat().st_size

    async def localflow(rep: int) -> Sample:
        task, coll = f"bench/{b.name('files')}", f"bench/{b.name('logs')}"
        cat = b.catalog({
            "collections": {coll: b.raw_collection(3)},
            "captures": {task: {
                "interval": "10s",
                "endpoint": {"files": {"directory": str(directory), "start_at": "beginning"}},
                "bindings": [{"target": coll, "resource": {"globs": ["*.jsonl"]}}],
            }},
        })
        timed = await b.run_task(cat, task, done=documents_done(task, n))
        await _expect_messages(b, topic_of(coll), n)
        return timed.sample(size / MB, n)

    async def ceiling(rep: int) -> Sample:
        topic = f"bench.{b.name('lines')}"
        await b.create_topic(topic, 3)
        producer = b.producer()
        await producer.start()
        try:
            with Meter() as meter:
                await _produce_lines(producer, topic, path)
        finally:
            await producer.stop()
        await _expect_messages(b, topic, n)
        return meter.sample(size / MB, n)

    lf, ce = await alternate(b.sizes.reps, localflow, ceiling)
    return ratio_row("file capture", "MB/s", lf, ce, 0.8,
                     f"one file of {n} JSON lines; the ceiling reads it and produces each line as it is, "
                     f"{WRITE_BATCH} lines per acknowledged batch")


async def _produce_lines(producer: Any, topic: str, path: Path) -> None:
    with path.open("rb") as f:
        batch = []
        for line in f:
            batch.append(await producer.send(topic, line.rstrip(b"\n")))
            if len(batch) >= WRITE_BATCH:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)


async def _expect_messages(b: Bench, topic: str, n: int) -> None:
    got = await b.topic_size(topic)
    if got != n:
        raise BenchError(f"topic {topic} holds {got} messages, expected {n}")


STAGES = {
    "write": collection_write,
    "read": collection_read,
    "derivation": derivation,
    "postgres": postgres,
    "redis": redis,
    "s3": s3,
    "files": file_capture,
}
