"""Collections on the real broker: keys, order per key, dead letters, foreign readers."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from pipeline.runtime.catalog import KafkaConfig
from pipeline.runtime.checkpoint import KafkaCheckpoints
from pipeline.runtime.collection import (
    RECORD_OVERHEAD,
    SCHEMA_HEADER,
    TASK_HEADER,
    Collection,
    CollectionReader,
    CollectionWriter,
    dead_letter,
    murmur2,
    original_of,
    read_to_end,
)
from pipeline.sdk.errors import CheckpointError, OffsetGap, ValidationFailed

SCHEMA = yaml.safe_load((Path(__file__).resolve().parent.parent / "examples/sophia/schemas/raw.schema.yaml")
                        .read_text())  # the Sophia raw documents, as the example catalog declares them


def doc(key: str, seq: int) -> dict[str, Any]:
    return {"timestamp": "2026-11-28T10:00:00Z", "source": "test", "data": {"seq": seq},
            "metadata": {"id": key}}


@pytest.fixture
def kafka(kafka_bootstrap: str) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=kafka_bootstrap)


@pytest.fixture
def collection(unique_name: Callable[..., str]) -> Collection:
    return Collection(f"test/{unique_name()}", SCHEMA, ["/metadata/id"], partitions=3)


async def test_documents_come_back_with_keys_in_order_per_key(kafka: KafkaConfig, collection: Collection) -> None:
    docs = [doc(f"k{i % 10}", i) for i in range(300)]
    async with CollectionWriter(kafka, "writer-task") as writer:
        result = await writer.write(collection, docs)
    assert (result.written, result.dead) == (300, 0)

    records = await read_to_end(kafka, collection.topic)
    assert len(records) == 300
    by_key: dict[bytes, list[int]] = defaultdict(list)
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert r.key == orjson.dumps([r.doc["metadata"]["id"]])
        by_key[r.key].append(r.doc["data"]["seq"])
        partitions_of_key[r.key].add(r.partition)
    assert len(by_key) == 10
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), f"documents of {key!r} out of order"
        assert len(partitions_of_key[key]) == 1
    assert len({r.partition for r in records}) > 1, "keys should spread over the 3 partitions"


async def test_messages_carry_task_and_schema_headers(kafka: KafkaConfig, collection: Collection) -> None:
    async with CollectionWriter(kafka, "header-task") as writer:
        await writer.write(collection, [doc("a", 1)])
    reader = CollectionReader(kafka, None, [collection])
    await reader.consumer.start()
    try:
        parts = sorted(reader.consumer.partitions_for_topic(collection.topic) or [])
        from aiokafka import TopicPartition

        reader.consumer.assign([TopicPartition(collection.topic, p) for p in parts])
        await reader.consumer.seek_to_beginning()
        message = None
        deadline = time.monotonic() + 120  # a deadline, not a count: a loaded machine only slows it
        while message is None and time.monotonic() < deadline:
            batch = await reader.consumer.getmany(timeout_ms=200)
            msgs = [m for ms in batch.values() for m in ms]
            if msgs:
                message = msgs[0]
        assert message is not None
        headers = dict(message.headers)
        assert headers[TASK_HEADER] == b"header-task"
        assert headers[SCHEMA_HEADER] == collection.fingerprint.encode()
    finally:
        await reader.consumer.stop()


async def test_invalid_documents_go_to_dead_letters_with_reason_and_bytes(
        kafka: KafkaConfig, collection: Collection) -> None:
    bad_time = doc("b", 2) | {"timestamp": "yesterday"}
    no_data = {k: v for k, v in doc("c", 3).items() if k != "data"}
    async with CollectionWriter(kafka, "dl-task") as writer:
        result = await writer.write(collection, [doc("a", 1), bad_time, no_data, doc("d", 4)])
    assert (result.written, result.dead) == (2, 2)

    good = await read_to_end(kafka, collection.topic)
    assert sorted(r.doc["metadata"]["id"] for r in good) == ["a", "d"]
    dead = await read_to_end(kafka, collection.dead_topic)
    assert len(dead) == 2
    envelopes = [r.doc for r in dead]
    errors = sorted(e["error"] for e in envelopes)
    assert "/timestamp must be date-time" in errors[0] or "/timestamp must be date-time" in errors[1]
    assert any("must contain ['timestamp', 'source', 'data', 'metadata']" in e or "data" in e for e in errors)
    for e in envelopes:
        assert e["task"] == "dl-task"
        assert e["collection"] == collection.name
        assert e["original_base64"] is None  # the original is stored once: as text when it is UTF-8
        assert e["original_size"] == len(original_of(e))
        assert e["original_sha256"] == hashlib.sha256(original_of(e)).hexdigest()
    originals = [orjson.loads(e["original"]) for e in envelopes]
    assert bad_time in originals and no_data in originals


def test_validate_names_the_failing_place(collection: Collection) -> None:
    with pytest.raises(ValidationFailed, match=r"/metadata/id must be string"):
        collection.validate(doc("a", 1) | {"metadata": {"id": 7}})


async def test_a_client_we_did_not_write_reads_json_keys_and_values(
        kafka: KafkaConfig, collection: Collection, unique_name: Callable[..., str]) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    async with CollectionWriter(kafka, "interop") as writer:
        await writer.write(collection, [doc(f"k{i}", i) for i in range(20)])

    def consume() -> list[tuple[Any, Any]]:
        consumer = confluent_kafka.Consumer({
            "bootstrap.servers": kafka.bootstrap_servers, "group.id": unique_name("g"),
            "auto.offset.reset": "earliest", "enable.auto.commit": False,
        })
        consumer.subscribe([collection.topic])
        out: list[tuple[Any, Any]] = []
        try:
            deadline = time.monotonic() + 120  # the group join alone takes seconds on a loaded machine
            while len(out) < 20 and time.monotonic() < deadline:
                m = consumer.poll(0.1)
                if m is not None and not m.error():
                    out.append((orjson.loads(m.key()), orjson.loads(m.value())))
        finally:
            consumer.close()
        return out

    seen = await asyncio.to_thread(consume)
    assert len(seen) == 20
    for key, value in seen:
        assert key == [value["metadata"]["id"]]
        assert value["source"] == "test"


def test_murmur2_is_the_java_clients_key_hash() -> None:
    # Kafka's UtilsTest.testMurmur2 vectors (Java returns them as signed ints).
    java = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
            b"a-little-bit-longer-string": -1486304829, b"abc": 479470107,
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971}
    assert {k: murmur2(k) - (1 << 32) * (murmur2(k) >> 31) for k in java} == java
    rng = random.Random(5)
    keys = [rng.randbytes(n) for n in range(90) for _ in range(20)]
    assert [murmur2(k) for k in keys] == [aiokafka_murmur2(k) for k in keys]


async def test_keys_land_in_the_partition_a_java_client_would_choose(
        kafka: KafkaConfig, collection: Collection, unique_name: Callable[..., str]) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    docs = [doc(f"key-{i}-{'x' * (i % 7)}", i) for i in range(60)]
    async with CollectionWriter(kafka, "partitions") as writer:
        await writer.write(collection, docs)
    ours = {r.key: r.partition for r in await read_to_end(kafka, collection.topic)}

    other = Collection(f"test/{unique_name()}", SCHEMA, ["/metadata/id"], partitions=3)
    async with CollectionWriter(kafka, "setup") as writer:
        await writer.ensure([other])

    def produce_like_java() -> dict[bytes, int]:
        placed: dict[bytes, int] = {}
        producer = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap_servers,
                                             "partitioner": "murmur2"})  # librdkafka's Java-compatible one
        for key in ours:
            producer.produce(other.topic, b"{}", key=key,
                             on_delivery=lambda err, m: placed.__setitem__(m.key(), m.partition()))
        producer.flush(30)
        return placed

    assert await asyncio.to_thread(produce_like_java) == ours
    assert len(set(ours.values())) == 3


async def test_group_reader_resumes_from_offsets_the_task_stored(kafka: KafkaConfig, collection: Collection,
                                                                 unique_name: Callable[..., str]) -> None:
    async with CollectionWriter(kafka, "w") as writer:
        await writer.write(collection, [doc(f"k{i}", i) for i in range(30)])
    stored: dict[Any, int] = {}
    first = await read_to_end(kafka, collection.topic)
    for r in first:  # the task "stored" that it already applied everything but the last record per partition
        stored[r.tp] = max(stored.get(r.tp, 0), r.offset)

    async def on_assign(tps: set[Any]) -> dict[Any, int | None]:
        return {tp: stored.get(tp) for tp in tps}

    reader = CollectionReader(kafka, unique_name("g"), [collection], on_assign=on_assign)
    await reader.start()
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 120  # the group join alone takes seconds on a loaded machine
        while len(got) < len(stored) and time.monotonic() < deadline:
            got += await reader.batch(timeout_ms=100)
        assert sorted((r.partition, r.offset) for r in got) == sorted((tp.partition, o) for tp, o in stored.items())
    finally:
        await reader.stop()


async def test_capture_checkpoints_round_trip_and_broken_ones_are_reported(
        kafka: KafkaConfig, unique_name: Callable[..., str]) -> None:
    store = KafkaCheckpoints(kafka, prefix=unique_name("checkpoints") + ".")
    async with CollectionWriter(kafka, "cp") as writer:
        assert await store.load("task-a") is None
        await store.save(writer, "task-a", {"cursor": 1})
        await store.save(writer, "task-b", {"cursor": 9})
        await store.save(writer, "task-a", {"cursor": 2})
        assert await store.load("task-a") == {"cursor": 2}
        fut = await writer.producer.send(store.topic("task-b"), b'{"version": 7}', key=b"task-b")
        await fut
    with pytest.raises(CheckpointError, match="checkpoint of task 'task-b' .* is unreadable"):
        await store.load("task-b")


def big_doc(key: str, size: int) -> dict[str, Any]:
    return doc(key, 0) | {"data": {"blob": "x" * size}}


async def test_document_larger_than_the_broker_accepts_becomes_a_dead_letter_that_fits(
        kafka: KafkaConfig, collection: Collection) -> None:
    huge = big_doc("huge", 2 * 1024 * 1024)
    async with CollectionWriter(kafka, "big-task") as writer:
        result = await writer.write(collection, [doc("a", 1), huge, doc("b", 2)], reason="invalid")
    assert (result.written, result.dead) == (2, 1)
    assert sorted(r.doc["metadata"]["id"] for r in await read_to_end(kafka, collection.topic)) == ["a", "b"]
    [dead] = await read_to_end(kafka, collection.dead_topic)
    assert len(dead.value) <= kafka.max_message_bytes - RECORD_OVERHEAD
    e = dead.doc
    whole = orjson.dumps(huge)
    assert e["reason"] == "too_large" and "kafka.max_message_bytes=1048576" in e["error"]
    assert (e["original_size"], e["original_sha256"]) == (len(whole), hashlib.sha256(whole).hexdigest())
    assert e["original_truncated"] is True and whole.startswith(original_of(e)) and len(original_of(e)) > 900_000
    assert e["source_position"] == huge["metadata"] and orjson.loads(e["key"]) == ["huge"]


async def test_dead_letter_of_a_large_invalid_document_holds_it_once_and_whole(
        kafka: KafkaConfig, collection: Collection) -> None:
    invalid = big_doc("bad", 700 * 1024) | {"timestamp": "yesterday"}  # twice stored, it would not fit 1 MiB
    async with CollectionWriter(kafka, "big-task") as writer:
        assert (await writer.write(collection, [invalid])).dead == 1
    [dead] = await read_to_end(kafka, collection.dead_topic)
    assert len(dead.value) < kafka.max_message_bytes - RECORD_OVERHEAD
    assert orjson.loads(original_of(dead.doc)) == invalid and "original_truncated" not in dead.doc


async def test_raw_bytes_too_large_for_a_dead_letter_are_cut_to_fit(
        kafka: KafkaConfig, collection: Collection) -> None:
    raw = b"\xff\x00" * (1024 * 1024)  # not UTF-8: base64, which is a third larger
    async with CollectionWriter(kafka, "big-task") as writer:
        await writer.write_dead(collection, "not JSON", raw, reason="unparseable")
    [dead] = await read_to_end(kafka, collection.dead_topic)
    assert len(dead.value) <= kafka.max_message_bytes - RECORD_OVERHEAD
    assert dead.doc["original"] is None and dead.doc["original_truncated"] is True
    assert raw.startswith(original_of(dead.doc)) and dead.doc["original_size"] == len(raw)


def test_dead_letter_cut_fits_even_when_json_escapes_inflate_the_text() -> None:
    original = b"\x01" * 400_000  # UTF-8, but every byte is written \u0001 (6 bytes) in JSON
    value = dead_letter(error="e", task="t", collection="c", original=original, limit=100_000)
    assert len(value) <= 100_000 and orjson.loads(value)["original_truncated"] is True


async def test_collection_topics_keep_records_as_long_as_the_catalog_declares(
        kafka: KafkaConfig, unique_name: Callable[..., str]) -> None:
    forever = Collection(f"test/{unique_name()}", SCHEMA, ["/metadata/id"])
    week = Collection(f"test/{unique_name()}", SCHEMA, ["/metadata/id"], retention=7 * 86400)
    async with CollectionWriter(kafka, "r") as writer:
        await writer.ensure([forever, week])
    admin = AIOKafkaAdminClient(**kafka.client_options())
    await admin.start()
    try:
        topics = [forever.topic, forever.dead_topic, week.topic, week.dead_topic]
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    finally:
        await admin.close()
    retention = {r[3]: {c[0]: c[1] for c in r[4]}.get("retention.ms")
                 for response in responses for r in response.resources}
    assert retention == {forever.topic: "-1", forever.dead_topic: "-1",
                         week.topic: "604800000", week.dead_topic: "604800000"}


async def test_stored_offset_beyond_the_end_is_a_loud_gap_not_a_silent_wait(
        kafka: KafkaConfig, collection: Collection, unique_name: Callable[..., str]) -> None:
    """A topic deleted and recreated: the endpoint's stored offset is past the new partition's end."""
    async with CollectionWriter(kafka, "w") as writer:
        await writer.write(collection, [doc(f"k{i}", i) for i in range(6)])
    ends = {r.tp: r.offset + 1 for r in await read_to_end(kafka, collection.topic)}

    async def on_assign(tps: set[Any]) -> dict[Any, int | None]:
        return {tp: ends.get(tp, 0) + (100 if tp.partition == 1 else 0) for tp in tps}

    reader = CollectionReader(kafka, unique_name("g"), [collection], on_assign=on_assign, task="gap-task")
    await reader.start()
    try:
        # Bounded by time, not by a count of polls: a loaded broker can hold the group join for
        # tens of seconds before the partition (and its gap) is assigned at all.
        deadline = time.monotonic() + 180
        with pytest.raises(OffsetGap) as caught:
            while time.monotonic() < deadline:
                await reader.batch(timeout_ms=100)
    finally:
        await reader.stop()
    gap = caught.value
    end = ends.get(TopicPartition(collection.topic, 1), 0)
    assert (gap.topic, gap.partition, gap.offset, gap.begin, gap.end) == (collection.topic, 1, end + 100, 0, end)
    assert f"stored offset {end + 100} of {collection.topic}[1] is beyond the end" in str(gap)
    assert f"offsets [0, {end})" in str(gap) and "localflow replay" in str(gap)
    assert not OffsetGap.retriable
