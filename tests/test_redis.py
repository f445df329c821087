"""The `redis` materialization against a real Redis and the real broker: keys, hashes, TTLs and
streams as configured; a replay never makes a key older; a replaced worker is fenced, and one
whose checkpoint was rewound stops; kill -9 of a worker at random points; Redis crashing with
and without persistence; two workers sharing partitions; the doctor, which never shows a password.

Tests on the session Redis isolate themselves by key prefix (templates and `state_prefix`);
tests that crash Redis start their own.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import TopicPartition
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import RedisError

from connectors.redis.config import RedisConfig
from connectors.redis.materialization import RedisMaterialization, doctor
from pipeline.embedded.services import Redis as RedisServer
from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection, read_to_end
from pipeline.runtime.registry import load_connector
from pipeline.runtime.task import TaskContext
from pipeline.sdk.errors import ConfigError, EndpointError, Fenced
from pipeline.sdk.materialization import Batch
from pipeline.sdk.records import SOURCE_HEADER, Record
from pipeline.sdk.retry import Backoff
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.workers import READER, Worker, task_worker
from tests.support.writing import produce

ROOT = Path(__file__).resolve().parent.parent

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "v": {"type": "integer"}, "region": {"type": "string"}},
    "required": ["id", "v"],
}
ODD_IDS = ["plain", "a:b:c", "ünïcødé ✓", "with space", "emoji 🚀", "{braces}", "slash/and\\back"]
"""Key values with separators, braces, and non-ASCII text: each must land under its own key."""


# -------------------------------------------------------------------------------- catalog helpers


def write_catalog(path: Path, kafka: str, collections: dict[str, int],
                  materializations: dict[str, dict[str, Any]]) -> Catalog:
    """A catalog of ``collections`` ({name: partitions}, schema SCHEMA) and redis materializations."""
    raw = {
        "kafka": {"bootstrap_servers": kafka},
        "collections": {name: {"schema": SCHEMA, "key": ["/id"], "partitions": n} for name, n in collections.items()},
        "materializations": materializations,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return load_catalog(path, env={})


def redis_task(url: str, prefix: str, bindings: list[dict[str, Any]], **advanced: Any) -> dict[str, Any]:
    return {"endpoint": {"redis": {"url": url, "advanced": {"state_prefix": f"{prefix}:lf:", **advanced}}},
            "bindings": bindings}


def direct_task(url: str, prefix: str, bindings: list[dict[str, Any]], **advanced: Any) -> dict[str, Any]:
    """A task a test drives by hand (``build``, then ``apply``): without overlap, so ``apply``
    returns once its batch is in Redis."""
    return redis_task(url, prefix, bindings, **{"overlap": False, **advanced})


def doc(id_: str, v: int, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "v": v, **extra}


def last_per_id(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What a latest-per-key cache must hold (one key always goes to one partition, in order)."""
    return {d["id"]: d for d in docs}


# -------------------------------------------------------------------------------- broker and Redis helpers


async def topic_ends(catalog: Catalog, collection: str) -> dict[str, int]:
    """Checkpoint fields a finished task must hold: the fetch high watermark of each partition."""
    topic = Collection.from_catalog(catalog, collection).topic
    ends: dict[str, int] = {}
    for r in await read_to_end(catalog.kafka, topic, timeout=60):
        ends[f"{topic}:{r.partition}"] = max(ends.get(f"{topic}:{r.partition}", 0), r.offset + 1)
    return ends


async def checkpoint(r: Redis, prefix: str, task: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await r.hgetall(f"{prefix}:lf:checkpoint:{task}")).items()}


async def wait_checkpointed(r: Redis, prefix: str, task: str, ends: dict[str, int], within: float = 60) -> None:
    async def reached() -> bool:
        return await checkpoint(r, prefix, task) == ends

    await wait_for_async(reached, timeout=within, interval=0.05, ignore=(RedisError, OSError),
                         message=f"checkpoint of {task} == {ends}")


async def json_values(r: Redis, keys: list[str]) -> list[Any]:
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    return [None if v is None else orjson.loads(v) for v in await pipe.execute()]


async def stream_versions(r: Redis, stream: str) -> dict[str, list[int]]:
    """Per key, the versions its stream entries carry, in stream order."""
    out: dict[str, list[int]] = {}
    start: bytes | str = "-"
    while entries := await r.xrange(stream, min=start, count=5_000):  # pages: small replies on a loaded machine
        for _id, fields in entries:
            out.setdefault(fields[b"key"].decode(), []).append(orjson.loads(fields[b"doc"])["v"])
        start = b"(" + entries[-1][0]
    return out


def errors_of(task: str, kind: str) -> float:
    return REGISTRY.get_sample_value("localflow_errors_total", {"task": task, "kind": kind}) or 0.0


def supervised(catalog: Catalog, task: str) -> AbstractAsyncContextManager[TaskContext]:
    """The materialization supervised in this process as a worker process runs it (short session and backoff)."""
    return running(catalog, task, options={"reader": READER}, backoff=Backoff(initial=0.2, maximum=2.0))


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, socket_timeout=60)
    try:
        yield client
    finally:
        await client.aclose()


# -------------------------------------------------------------------------------- keys, hashes, TTLs, streams


@dataclass
class Materialized:
    """Two collections materialized once by one task; the tests below read what it left."""

    catalog: Catalog
    prefix: str
    task: str
    docs: str
    last_docs: dict[str, dict[str, Any]]
    written: int
    ends: dict[str, int]


@pytest.fixture(scope="module")
async def materialized(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str,
                       redis_url: str) -> Materialized:
    prefix = f"t_{os.urandom(8).hex()}"
    docs, rows = f"{prefix}/docs", f"{prefix}/rows"
    bindings = [
        {"source": docs, "resource": {"stream": f"{prefix}:feed", "stream_maxlen": 10_000}},
        {"source": rows, "resource": {"key": f"{prefix}:row:{{/id}}", "value": "hash", "ttl": "1h"}},
    ]
    catalog = write_catalog(tmp_path_factory.mktemp("redis") / "flow.yaml", kafka_bootstrap, {docs: 3, rows: 2}, {
        f"{prefix}/redis": redis_task(redis_url, prefix, bindings),
        f"{prefix}/replay": redis_task(redis_url, prefix, bindings),
    })
    ids = ODD_IDS + [f"id-{i}" for i in range(60)]
    doc_versions = [doc(i, v, region=f"r{v}") for v in (1, 2, 3) for i in ids]
    row_versions = [doc(i, v, meta={"tags": ["x", v], "nested": {"ok": v > 1}}, score=v / 4, flag=v == 2,
                        **({"region": "eu"} if v == 1 else {}))
                    for v in (1, 2) for i in ids]
    await produce(catalog, docs, doc_versions)
    await produce(catalog, rows, row_versions)
    ends = await topic_ends(catalog, docs) | await topic_ends(catalog, rows)
    async with Redis.from_url(redis_url, socket_timeout=60) as client, supervised(catalog, f"{prefix}/redis"):
        await wait_checkpointed(client, prefix, f"{prefix}/redis", ends)
    return Materialized(catalog, prefix, f"{prefix}/redis", docs, last_per_id(doc_versions),
                        len(doc_versions), ends)


async def test_json_keys_hold_the_last_document_under_the_default_template(materialized: Materialized,
                                                                          r: Redis) -> None:
    m = materialized
    keys = [f"{m.docs}:{i}" for i in m.last_docs]
    assert await json_values(r, keys) == list(m.last_docs.values())
    found = [k async for k in r.scan_iter(match=f"{m.docs}:*", count=1000)]
    assert sorted(k.decode() for k in found) == sorted(keys)


async def test_hash_keys_hold_top_level_fields_with_objects_as_json(materialized: Materialized, r: Redis) -> None:
    m = materialized
    got = await r.hgetall(f"{m.prefix}:row:ünïcødé ✓")
    assert {k.decode(): v.decode() for k, v in got.items()} == {
        "id": "ünïcødé ✓", "v": "2", "meta": '{"tags":["x",2],"nested":{"ok":true}}', "score": "0.5", "flag": "true",
    }  # `region` was only in version 1: the hash holds the last document, not a merge


async def test_ttl_is_set_on_keys_of_a_binding_with_ttl(materialized: Materialized, r: Redis) -> None:
    m = materialized
    assert 3_590_000 < await r.pttl(f"{m.prefix}:row:a:b:c") <= 3_600_000
    assert await r.pttl(f"{m.docs}:a:b:c") == -1  # no TTL configured: the key persists


async def test_stream_gets_one_entry_per_document_in_order(materialized: Materialized, r: Redis) -> None:
    m = materialized
    assert await r.xlen(f"{m.prefix}:feed") == m.written
    assert await stream_versions(r, f"{m.prefix}:feed") == {f"{m.docs}:{i}": [1, 2, 3] for i in m.last_docs}


async def test_checkpoint_holds_the_end_of_every_partition(materialized: Materialized, r: Redis) -> None:
    m = materialized
    assert await checkpoint(r, m.prefix, m.task) == m.ends


async def test_replay_from_the_beginning_never_makes_a_key_older(materialized: Materialized, r: Redis) -> None:
    m = materialized
    replay = f"{m.prefix}/replay"  # same keyspace, no checkpoint of its own: reads every topic from offset 0
    async with supervised(m.catalog, replay):
        await wait_checkpointed(r, m.prefix, replay, m.ends)
    assert await json_values(r, [f"{m.docs}:{i}" for i in m.last_docs]) == list(m.last_docs.values())
    assert (await r.hgetall(f"{m.prefix}:row:plain"))[b"v"] == b"2"
    assert await r.xlen(f"{m.prefix}:feed") == m.written  # refused documents are not streamed again


# -------------------------------------------------------------------------------- fencing, dead letters (no group)


def build(catalog: Catalog, task: str, ctx: TaskContext | None = None) -> RedisMaterialization:
    return load_connector("redis").build(*(ctx or TaskContext(catalog, task, "materialization")).for_connector())


def batch(topic: str, records: list[tuple[int, dict[str, Any]]]) -> Batch:
    return Batch([Record(topic, 0, offset, 0, None, orjson.dumps(d), d) for offset, d in records], {topic: 0})


@asynccontextmanager
async def two_workers(tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str],
                      overlap: bool = False) -> AsyncIterator[tuple[str, str, str, TopicPartition, Any, Any]]:
    """Two workers of one materialization "m" on one partition: (prefix, collection, topic, tp, old, new)."""
    prefix = unique_name()
    coll = f"{prefix}/docs"
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {coll: 1},
                            {"m": direct_task(redis_url, prefix, [{"source": coll}], overlap=overlap)})
    old, new = build(catalog, "m"), build(catalog, "m")
    await old.open()
    await new.open()
    try:
        yield prefix, coll, f"{prefix}.docs", TopicPartition(f"{prefix}.docs", 0), old, new
    finally:
        await old.close(failed=True)
        await new.close(failed=False)


async def test_replaced_worker_is_fenced_and_writes_nothing(tmp_path: Path, kafka_bootstrap: str, redis_url: str,
                                                           unique_name: Callable[..., str], r: Redis) -> None:
    async with two_workers(tmp_path, kafka_bootstrap, redis_url, unique_name) as (prefix, coll, topic, tp, old, new):
        assert await old.assigned({tp}) == {tp: None}
        await old.apply(batch(topic, [(0, doc("k", 1)), (1, doc("k", 2))]))
        assert await new.assigned({tp}) == {tp: 2}  # the new owner resumes where the old one stopped

        with pytest.raises(Fenced, match="taken over by another worker"):
            await old.apply(batch(topic, [(2, doc("k", 3)), (3, doc("other", 1))]))
        assert await json_values(r, [f"{coll}:k", f"{coll}:other"]) == [doc("k", 2), None]
        assert await checkpoint(r, prefix, "m") == {f"{topic}:0": 2}

        await new.apply(batch(topic, [(2, doc("k", 3))]))
        assert await json_values(r, [f"{coll}:k"]) == [doc("k", 3)]


async def test_with_overlap_apply_reports_the_batch_before_and_a_failure_in_flight_comes_next(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    """``advanced.overlap`` (the default): ``apply`` sends its batch and reports the one before; a
    rebalance waits for the batch in flight and the next call reports it; a batch fenced in flight
    writes nothing, and the next call raises it."""
    async with two_workers(tmp_path, kafka_bootstrap, redis_url, unique_name, overlap=True) as (
            prefix, coll, topic, tp, old, new):
        await old.assigned({tp})
        assert (await old.apply(batch(topic, [(0, doc("k", 1))]))).offsets == {}  # in flight
        second = await old.apply(batch(topic, [(1, doc("k", 2))]))
        assert (second.offsets, second.documents) == ({tp: 1}, {0: 1})
        await old.revoked({tp})  # waits for the second batch
        assert (await old.tick()).offsets == {tp: 2}
        assert await json_values(r, [f"{coll}:k"]) == [doc("k", 2)]

        assert await old.assigned({tp}) == {tp: 2}
        assert await new.assigned({tp}) == {tp: 2}
        assert (await old.apply(batch(topic, [(2, doc("k", 3))]))).offsets == {}
        with pytest.raises(Fenced, match="taken over by another worker"):
            await old.tick()
        assert await json_values(r, [f"{coll}:k"]) == [doc("k", 2)]
        assert await checkpoint(r, prefix, "m") == {f"{topic}:0": 2}


async def test_rewind_past_a_gap_sets_the_checkpoint_back_only_under_the_current_fence(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    """`localflow replay` past a recreated topic: the stored offset goes back to the new end, and a
    replaced worker's rewind changes nothing."""
    async with two_workers(tmp_path, kafka_bootstrap, redis_url, unique_name) as (prefix, coll, topic, tp, old, new):
        await old.assigned({tp})
        await old.apply(batch(topic, [(i, doc(f"k{i}", 1)) for i in range(20)]))
        assert await new.assigned({tp}) == {tp: 20}
        assert await old.rewind({tp: 0}) == {}, "a replaced worker rewound the checkpoint"
        assert await checkpoint(r, prefix, "m") == {f"{topic}:0": 20}
        assert await new.rewind({tp: 0}) == {tp: 0}
        assert await checkpoint(r, prefix, "m") == {f"{topic}:0": 0}
        await new.apply(batch(topic, [(0, doc("fresh", 1))]))  # the recreated topic's first record applies
        assert await json_values(r, [f"{coll}:fresh"]) == [doc("fresh", 1)]
        assert await checkpoint(r, prefix, "m") == {f"{topic}:0": 1}


async def test_a_derived_document_older_at_its_source_is_refused_whatever_its_offset(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    # A stalled derivation worker's late output: v1 again, at a higher offset of the derived topic.
    prefix = unique_name()
    coll = f"{prefix}/derived"
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {coll: 1}, {"m": direct_task(
        redis_url, prefix, [{"source": coll, "resource": {"stream": f"{prefix}:feed"}}])})
    topic, tp = f"{prefix}.derived", TopicPartition(f"{prefix}.derived", 0)

    def derived(offset: int, d: dict[str, Any], source: bytes) -> Record:
        return Record(topic, 0, offset, 0, None, orjson.dumps(d), d, headers=[(SOURCE_HEADER, source)])

    m = build(catalog, "m")
    await m.open()
    try:
        await m.assigned({tp})
        await m.apply(Batch([derived(0, doc("k", 1), b"raw:0:10"), derived(1, doc("k", 2), b"raw:0:11")], {topic: 0}))
        await m.apply(Batch([derived(2, doc("k", 1), b"raw:0:10"), derived(3, doc("j", 1), b"raw:1:4")], {topic: 0}))
    finally:
        await m.close(failed=False)
    assert await json_values(r, [f"{coll}:k", f"{coll}:j"]) == [doc("k", 2), doc("j", 1)]
    assert await stream_versions(r, f"{prefix}:feed") == {f"{coll}:k": [1, 2], f"{coll}:j": [1]}
    assert await r.get(f"{prefix}:lf:pos:{coll}:k") == b"raw:0:11"


async def test_two_bindings_whose_templates_render_the_same_key_do_not_refuse_each_other(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    prefix = unique_name()
    first, second = f"{prefix}/first", f"{prefix}/second"
    by_id, by_region = {"key": f"{prefix}:x:{{/id}}"}, {"key": f"{prefix}:x:{{/region}}"}  # both render x:k
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {first: 1, second: 1}, {"m": direct_task(
        redis_url, prefix, [{"source": first, "resource": by_id}, {"source": second, "resource": by_region}])})
    topics = {f"{prefix}.first": 0, f"{prefix}.second": 1}
    m = build(catalog, "m")
    await m.open()
    try:
        await m.assigned({TopicPartition(t, 0) for t in topics})
        one = orjson.dumps(doc("k", 1))
        await m.apply(Batch([Record(f"{prefix}.first", 0, 5, 0, None, one, orjson.loads(one))], topics))
        two = orjson.dumps(doc("other", 2, region="k"))  # a lower offset, but of another topic: the later write wins
        await m.apply(Batch([Record(f"{prefix}.second", 0, 3, 0, None, two, orjson.loads(two))], topics))
    finally:
        await m.close(failed=False)
    assert await json_values(r, [f"{prefix}:x:k"]) == [doc("other", 2, region="k")]


async def test_a_chunk_of_thousands_of_documents_keeps_the_last_write_of_every_key_in_order(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    """One script call of 3,000 documents: keys repeat inside it, and two bindings (one with a TTL)
    write the same keys in turn. The script reads positions and writes values in slices of many
    keys, and must still leave each key its last write in batch order, with that write's TTL."""
    prefix = unique_name()
    first, second = f"{prefix}/first", f"{prefix}/second"
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {first: 1, second: 1}, {"m": direct_task(
        redis_url, prefix, [{"source": first, "resource": {"key": f"{prefix}:x:{{/id}}"}},
                            {"source": second, "resource": {"key": f"{prefix}:x:{{/region}}", "ttl": "1h"}}],
        chunk_size=5_000)})
    topics = {f"{prefix}.first": 0, f"{prefix}.second": 1}
    records, offsets, last = [], dict.fromkeys(topics, 0), {}
    for i in range(3_000):
        topic = f"{prefix}.second" if i % 3 == 2 else f"{prefix}.first"
        d = doc(f"o{i}", i, region=f"k{i % 1_100}") if i % 3 == 2 else doc(f"k{i % 1_100}", i)
        value = orjson.dumps(d)
        records.append(Record(topic, 0, offsets[topic], 0, None, value, d))
        last[f"{prefix}:x:k{i % 1_100}"] = (d, topic, offsets[topic])
        offsets[topic] += 1
    m = build(catalog, "m")
    await m.open()
    try:
        await m.assigned({TopicPartition(t, 0) for t in topics})
        applied = await m.apply(Batch(records, topics))
        assert sum(applied.documents.values()) == 3_000
    finally:
        await m.close(failed=False)
    keys = sorted(last)
    assert await json_values(r, keys) == [last[k][0] for k in keys]
    positions = await r.mget([f"{prefix}:lf:pos:{k}" for k in keys])
    assert [p.decode() for p in positions] == [f"{last[k][1]}:0:{last[k][2]}" for k in keys]
    ttls = [await r.pttl(k) for k in keys]
    assert [t > 0 for t in ttls] == [last[k][1] == f"{prefix}.second" for k in keys]


async def test_a_json_and_a_hash_binding_writing_one_key_in_one_chunk_leave_the_last_write(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    """The script defers JSON values to one MSET; a hash written after a deferred value of its key
    must still win, and a JSON value after a hash too."""
    prefix = unique_name()
    first, second = f"{prefix}/first", f"{prefix}/second"
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {first: 1, second: 1}, {"m": direct_task(
        redis_url, prefix, [{"source": first, "resource": {"key": f"{prefix}:x:{{/id}}"}},
                            {"source": second, "resource": {"key": f"{prefix}:x:{{/region}}", "value": "hash"}}])})
    topics = {f"{prefix}.first": 0, f"{prefix}.second": 1}

    def record(topic: str, offset: int, d: dict[str, Any]) -> Record:
        return Record(f"{prefix}.{topic}", 0, offset, 0, None, orjson.dumps(d), d)

    m = build(catalog, "m")
    await m.open()
    try:
        await m.assigned({TopicPartition(t, 0) for t in topics})
        await m.apply(Batch([record("first", 0, doc("a", 1)), record("second", 0, doc("o1", 2, region="a")),
                             record("first", 1, doc("b", 1)), record("second", 1, doc("o2", 2, region="b")),
                             record("first", 2, doc("b", 3))], topics))
    finally:
        await m.close(failed=False)
    assert (await r.type(f"{prefix}:x:a"), await r.hgetall(f"{prefix}:x:a")) == (b"hash", {
        b"id": b"o1", b"v": b"2", b"region": b"a"})
    assert await json_values(r, [f"{prefix}:x:b"]) == [doc("b", 3)]


async def test_checkpoint_rewound_under_a_worker_stops_it_before_it_writes(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    prefix = unique_name()
    coll = f"{prefix}/docs"
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {coll: 1},
                            {"m": direct_task(redis_url, prefix, [{"source": coll}])})
    topic, tp = f"{prefix}.docs", TopicPartition(f"{prefix}.docs", 0)
    m = build(catalog, "m")
    await m.open()
    try:
        await m.assigned({tp})
        await m.apply(batch(topic, [(0, doc("k", 1)), (1, doc("k", 2))]))
        await r.hset(f"{prefix}:lf:checkpoint:m", f"{topic}:0", 1)  # as if Redis came back from an older snapshot
        with pytest.raises(EndpointError, match="not where this worker left it"):
            await m.apply(batch(topic, [(2, doc("k", 3))]))
    finally:
        await m.close(failed=True)
    assert await json_values(r, [f"{coll}:k"]) == [doc("k", 2)]  # nothing of the refused batch was written


async def test_stream_key_holding_another_type_is_a_config_error_that_writes_nothing(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    prefix = unique_name()
    coll = f"{prefix}/docs"
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {coll: 1}, {"m": direct_task(
        redis_url, prefix, [{"source": coll, "resource": {"stream": f"{prefix}:feed"}}])})
    topic, tp = f"{prefix}.docs", TopicPartition(f"{prefix}.docs", 0)
    await r.set(f"{prefix}:feed", "not a stream")
    m = build(catalog, "m")
    await m.open()
    try:
        await m.assigned({tp})
        with pytest.raises(ConfigError, match=f"stream key '{prefix}:feed' .* holds a string"):
            await m.apply(batch(topic, [(0, doc("k", 1))]))
    finally:
        await m.close(failed=True)
    assert await json_values(r, [f"{coll}:k"]) == [None]
    assert await checkpoint(r, prefix, "m") == {}


async def test_document_without_a_template_value_goes_to_dead_letters(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    prefix = unique_name()
    coll = f"{prefix}/docs"
    binding = {"source": coll, "resource": {"key": f"{prefix}:{{/region}}:{{/id}}"}}  # /region is optional
    catalog = write_catalog(tmp_path / "flow.yaml", kafka_bootstrap, {coll: 1},
                            {"m": direct_task(redis_url, prefix, [binding])})
    topic, tp = f"{prefix}.docs", TopicPartition(f"{prefix}.docs", 0)
    ctx = TaskContext(catalog, "m", "materialization")
    m = build(catalog, "m", ctx)
    await m.open()
    try:
        await m.assigned({tp})
        await m.apply(batch(topic, [(0, doc("a", 1, region="eu")), (1, doc("b", 1)), (2, doc("c", 1, region="us"))]))
    finally:
        await m.close(failed=False)
        await ctx.aclose()
    assert await json_values(r, [f"{prefix}:eu:a", f"{prefix}:us:c"]) == [doc("a", 1, region="eu"),
                                                                         doc("c", 1, region="us")]
    assert await checkpoint(r, prefix, "m") == {f"{topic}:0": 3}  # the bad document is not re-read forever
    dead = [orjson.loads(d.value) for d in await read_to_end(catalog.kafka, f"{topic}.dead")]
    assert [(d["task"], orjson.loads(d["original"])) for d in dead] == [("m", doc("b", 1))]
    assert "/region" in dead[0]["error"]


# -------------------------------------------------------------------------------- crashes


@dataclass
class Flow:
    """One collection kept in Redis by one task: keys ``<prefix>:<id>``, stream ``<prefix>:feed``."""

    prefix: str
    path: Path
    catalog: Catalog
    coll: str
    task: str
    stream: str

    def keys(self, ids: Iterable[str]) -> list[str]:
        return [f"{self.prefix}:{i}" for i in ids]

    async def ends(self) -> dict[str, int]:
        return await topic_ends(self.catalog, self.coll)


def streamed(tmp_path: Path, kafka: str, url: str, prefix: str, partitions: int, **advanced: Any) -> Flow:
    coll, task, stream = f"{prefix}/docs", f"{prefix}/redis", f"{prefix}:feed"
    resource = {"key": f"{prefix}:{{/id}}", "stream": stream, "stream_maxlen": 1_000_000}
    path = tmp_path / "flow.yaml"
    catalog = write_catalog(path, kafka, {coll: partitions},
                            {task: redis_task(url, prefix, [{"source": coll, "resource": resource}], **advanced)})
    return Flow(prefix, path, catalog, coll, task, stream)


async def assert_last_per_key(r: Redis, flow: Flow, docs: list[dict[str, Any]]) -> None:
    """Each key holds its last document, and the stream holds every document once, in order."""
    last = last_per_id(docs)
    assert await json_values(r, flow.keys(last)) == list(last.values())
    versions: dict[str, list[int]] = {}
    for d in docs:
        versions.setdefault(f"{flow.prefix}:{d['id']}", []).append(d["v"])
    assert await stream_versions(r, flow.stream) == versions


def assignments(log: Path) -> int:
    return log.read_text().count("INFO assigned ")


async def test_kill_9_at_random_points_leaves_the_last_document_per_key(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    flow = streamed(tmp_path, kafka_bootstrap, redis_url, unique_name(), partitions=3)
    ids = [f"{ODD_IDS[k % len(ODD_IDS)]}:{k}" for k in range(5_000)]
    docs = [doc(ids[i % len(ids)], i) for i in range(100_000)]
    await produce(flow.catalog, flow.coll, docs)
    ends = await flow.ends()

    seed = random.randrange(1 << 30)
    targets = sorted(random.Random(seed).sample(range(2_000, 98_000), 6))
    log = tmp_path / "worker.log"
    for target in targets:
        proc = task_worker(flow.path, flow.task, log)
        try:
            async def progressed(target: int = target, proc: Worker = proc) -> bool:
                assert proc.alive, f"worker died on its own:\n{proc.tail()}"
                return sum((await checkpoint(r, flow.prefix, flow.task)).values()) >= target

            await wait_for_async(progressed, timeout=60, interval=0.01, message=f"{target} documents (seed {seed})")
        finally:
            proc.kill()
    started = assignments(log)
    proc = task_worker(flow.path, flow.task, log)
    try:  # the last killed worker may have finished already: SIGTERM only once this one runs
        await wait_for_async(lambda: assignments(log) > started, timeout=60, message="the last worker to start")
        await wait_checkpointed(r, flow.prefix, flow.task, ends, within=90)
    finally:
        proc.assert_exit(proc.stop(timeout=30))
    await assert_last_per_key(r, flow, docs)
    assert await checkpoint(r, flow.prefix, flow.task) == ends


class DurableRedis(RedisServer):
    """redis-server with an append-only file synced on every write: a crash loses nothing acknowledged."""

    def _command(self) -> list[str]:
        return [*super()._command(), "--appendonly", "yes", "--appendfsync", "always"]


async def crash_while_streaming(tmp_path: Path, kafka: str, server: RedisServer, prefix: str) -> TaskContext:
    """Materialize a wave, kill Redis, write a second wave while it is down, start it again; check Redis."""
    flow = streamed(tmp_path, kafka, server.url, prefix, partitions=3, retry={"give_up_after": "2m"})
    waves = [[doc(f"k{i % 500}", w * 10_000 + i) for i in range(3_000)] for w in (0, 1)]
    async with Redis.from_url(server.url, socket_timeout=60) as client, supervised(flow.catalog, flow.task) as ctx:
        await produce(flow.catalog, flow.coll, waves[0])
        await wait_checkpointed(client, prefix, flow.task, await flow.ends())
        failures = errors_of(flow.task, "endpoint")
        server.kill()
        await produce(flow.catalog, flow.coll, waves[1])
        await wait_for_async(lambda: errors_of(flow.task, "endpoint") > failures, timeout=30,
                             message="the task to meet the dead Redis")
        server.start()
        await wait_checkpointed(client, prefix, flow.task, await flow.ends(), within=90)
        await assert_last_per_key(client, flow, waves[0] + waves[1])
    return ctx


async def test_redis_crash_with_persistence_is_retried_and_the_task_stays_up(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    server = DurableRedis()
    server.start()
    try:
        ctx = await crash_while_streaming(tmp_path, kafka_bootstrap, server, unique_name())
    finally:
        server.stop()
    assert ctx.status.restarts == 0, ctx.status.last_error


async def test_redis_restart_without_persistence_is_rebuilt_from_the_topics(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    server = RedisServer()  # `--save ''`: it comes back empty
    server.start()
    try:
        ctx = await crash_while_streaming(tmp_path, kafka_bootstrap, server, unique_name())
    finally:
        server.stop()
    assert ctx.status.restarts >= 1
    assert "lost this task's fence" in (ctx.status.last_error or "")


async def test_two_workers_share_partitions_and_a_paused_one_is_fenced(
        tmp_path: Path, kafka_bootstrap: str, redis_url: str, unique_name: Callable[..., str], r: Redis) -> None:
    flow = streamed(tmp_path, kafka_bootstrap, redis_url, unique_name(), partitions=4)
    docs: list[dict[str, Any]] = []

    async def wave() -> None:
        new = [doc(f"k{i % 2_000}", len(docs) + i) for i in range(5_000)]
        await produce(flow.catalog, flow.coll, new)
        docs.extend(new)
        await wait_checkpointed(r, flow.prefix, flow.task, await flow.ends(), within=60)

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = task_worker(flow.path, flow.task, logs[0])
    b = None
    try:
        await wave()
        b = task_worker(flow.path, flow.task, logs[1])
        await wait_for_async(lambda: assignments(logs[1]) > 0, timeout=30, message="worker b to get partitions")
        await wave()
        a.pause()  # a zombie: its session expires, b takes everything over
        await wave()
        a.resume()
        await wave()
    finally:
        a.assert_exit(a.stop(timeout=30))
        if b is not None:
            b.assert_exit(b.stop(timeout=30))
    assert all(assignments(log) for log in logs)
    await assert_last_per_key(r, flow, docs)  # handovers neither lose nor repeat a stream entry


# -------------------------------------------------------------------------------- doctor and catalog


async def test_doctor_reports_the_server_version(redis_url: str) -> None:
    [check] = await doctor(RedisConfig.model_validate({"url": redis_url}))
    assert check.ok, check.detail
    assert re.search(r"Redis \d+\.\d+", check.detail)


async def test_doctor_never_shows_the_password(redis_url: str) -> None:
    secret = "s3cr3t-Pa55word"
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    configs = [
        RedisConfig.model_validate({"url": f"redis://:{secret}@127.0.0.1:1/0"}),  # nobody listens
        RedisConfig.model_validate({"port": port, "password": secret, "username": "nobody"}),  # WRONGPASS
    ]
    for config in configs:
        [check] = await doctor(config)
        assert not check.ok
        assert secret not in check.name + check.detail
        assert secret not in repr(config)


def test_sophia_catalog_keeps_all_four_collections_in_redis_db_0() -> None:
    catalog = load_catalog(ROOT / "examples" / "sophia" / "flow.yaml", env={"REDIS_PASSWORD": "pw-from-env"})
    spec = catalog.materializations["sophia/redis"]
    config: RedisConfig = spec.config
    assert (config.host, config.port, config.db, config.url) == ("127.0.0.1", 6379, 0, None)
    assert config.password is not None and config.password.get_secret_value() == "pw-from-env"
    assert sorted(b.source for b in spec.bindings) == sorted(catalog.collections)
    assert load_catalog(ROOT / "examples" / "sophia" / "flow.yaml", env={}).materializations[
        "sophia/redis"].config.password is None


def test_key_template_mistakes_are_reported_with_their_place(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        write_catalog(tmp_path / "flow.yaml", "127.0.0.1:9092", {"a/b": 1}, {"m": redis_task("redis://127.0.0.1", "p", [
            {"source": "a/b", "resource": {"key": "x:{id}"}},
        ])})
    [(place, message)] = e.value.problems
    assert place == "materializations.m.bindings[0].resource.key"
    assert "{/id}" in message
