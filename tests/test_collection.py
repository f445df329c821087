"""Collections on the real broker: keys, order per key, dead letters, foreign readers."""

from __future__ import annotations

import asyncio
import base64
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from pipeline.catalog import KafkaConfig
from pipeline.checkpoint import KafkaCheckpoints
from pipeline.collection import (
    SCHEMA_HEADER,
    TASK_HEADER,
    Collection,
    CollectionReader,
    CollectionWriter,
    murmur2,
    read_to_end,
)
from pipeline.errors import CheckpointError, ValidationFailed

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
        for _ in range(50):
            batch = await reader.consumer.getmany(timeout_ms=200)
            msgs = [m for ms in batch.values() for m in ms]
            if msgs:
                message = msgs[0]
                break
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
        assert orjson.loads(base64.b64decode(e["original_base64"])) == orjson.loads(e["original"])
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
            for _ in range(300):
                if len(out) >= 20:
                    break
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
        for _ in range(200):
            got += await reader.batch(timeout_ms=100)
            if len(got) >= len(stored):
                break
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
