"""The S3 archive against moto's S3 server and the real broker.

Most tests drive the materialization through its contract (open / assigned / apply / tick /
close) with records read from Kafka: fast and deterministic. The fault tests run the real
task in a consumer group, in this process (S3 outages) or in a child process (kill -9).
The archive is always read back independently here (plain aioboto3, gzip, zstandard).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import random
import re
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import orjson
import pytest
import yaml
import zstandard
from aiokafka import AIOKafkaProducer, TopicPartition
from botocore.exceptions import ClientError
from prometheus_client import REGISTRY

from connectors.s3.config import S3Config, S3Resource
from connectors.s3.verify import verify_binding
from pipeline.embedded.services import S3, Services, free_port
from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection, CollectionWriter, read_to_end
from pipeline.runtime.registry import load_connector
from pipeline.runtime.task import STATUS, TaskContext
from pipeline.sdk.errors import ConfigError, Fenced
from pipeline.sdk.materialization import Applied, Batch
from pipeline.sdk.records import Record
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.workers import READER, Worker, task_worker
from tests.support.writing import produce

ROOT = Path(__file__).resolve().parent.parent
AWS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}, "n": {"type": "integer"}}, "required": ["id"]}
TASK = "archive"
PREFIX = "archive/"
KEY = re.compile(r"^(?P<base>.+?/)(?:v(?P<version>\d{4})/)?dt=(?P<date>\d{4}-\d{2}-\d{2})/hr=(?P<hour>\d{2})/"
                 r"p=(?P<p>\d+)/(?P<first>\d{20})-(?P<last>\d{20})\.jsonl(?P<ext>\.gz|\.zst)?$")


# ------------------------------------------------------------------ catalog and producing


@dataclass
class Env:
    kafka: str
    s3: str
    bucket: str
    tmp: Path

    def catalog(self, collections: dict[str, int], resource: dict[str, Any] | None = None, *,
                endpoint: dict[str, Any] | None = None, task: str = TASK, file: str = "flow.yaml",
                overlap: bool = False) -> Catalog:
        """A catalog archiving each collection (name -> partitions) with the same resource. Without
        ``overlap`` unless asked: most tests drive ``apply`` by hand and read the bucket right after."""
        endpoint = dict(endpoint or {})
        endpoint["advanced"] = {"overlap": overlap, **endpoint.get("advanced", {})}
        doc = {
            "kafka": {"bootstrap_servers": self.kafka},
            "collections": {c: {"schema": SCHEMA, "key": ["/id"], "partitions": p} for c, p in collections.items()},
            "materializations": {task: {
                "endpoint": {"s3": {"bucket": self.bucket, "prefix": PREFIX, "endpoint_url": self.s3,
                                    "aws_access_key_id": "test", "aws_secret_access_key": "test",
                                    "create_bucket": True, **endpoint}},
                "bindings": [{"source": c, "resource": resource or {}} for c in collections],
            }},
        }
        path = self.tmp / file
        path.write_text(yaml.safe_dump(doc))
        return load_catalog(path)


@pytest.fixture
def env(kafka_bootstrap: str, s3_endpoint_url: str, unique_name: Callable[..., str], tmp_path: Path) -> Env:
    return Env(kafka_bootstrap, s3_endpoint_url, unique_name("b", sep="-"), tmp_path)


def docs(tag: str, n: int, pad: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"{tag}-{i}", "n": i, **({"pad": "x" * pad} if pad else {})} for i in range(n)]


async def produce_at(catalog: Catalog, collection: str, values: list[tuple[bytes, int]]) -> None:
    """Write raw values with chosen Kafka timestamps (ms) to partition 0."""
    c = Collection.from_catalog(catalog, collection)
    async with CollectionWriter(catalog.kafka, "test") as writer:
        await writer.ensure([c])
    producer = AIOKafkaProducer(bootstrap_servers=catalog.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        for value, ts in values:
            await producer.send_and_wait(c.topic, value, partition=0, timestamp_ms=ts)
    finally:
        await producer.stop()


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


async def started(catalog: Catalog, task: str = TASK) -> Any:
    m = load_connector("s3").build(*TaskContext(catalog, task, "materialization").for_connector())
    await m.open()
    return m


async def archive(catalog: Catalog, coll: str, records: list[Record], *, partitions: int = 1,
                  failed: bool = False, applied: list[Applied] | None = None) -> dict[TopicPartition, int | None]:
    """One worker's whole life: open, assigned, one batch, close. Returns where it resumed; what the
    connector says it applied goes to ``applied``."""
    m = await started(catalog)
    resumed = await m.assigned(tps(coll, partitions))
    said = [await m.apply(Batch(records, {coll: 0})), await m.close(failed=failed)]
    if applied is not None:
        applied += said
    return resumed


def binding_of(catalog: Catalog, task: str = TASK) -> tuple[S3Config, str, S3Resource]:
    """The first binding of the task, as ``verify_binding`` takes it."""
    spec = catalog.materializations[task]
    return spec.config, spec.bindings[0].source, spec.bindings[0].parsed


def tps(collection: str, partitions: int = 1) -> set[TopicPartition]:
    return {TopicPartition(collection, p) for p in range(partitions)}


# ------------------------------------------------------------------ reading the archive back


@dataclass
class Obj:
    key: str
    metadata: dict[str, str]
    content_type: str
    encoding: str | None
    etag: str
    size: int
    """Bytes stored (compressed)."""
    raw: bytes
    """The decompressed body."""

    @property
    def name(self) -> re.Match[str]:
        m = KEY.match(self.key)
        assert m, f"{self.key} is not named <prefix><collection>/dt=../hr=../p=../<first>-<last>.jsonl[.gz|.zst]"
        return m

    @property
    def lines(self) -> list[bytes]:
        assert self.raw.endswith(b"\n") or not self.raw
        return self.raw.split(b"\n")[:-1]

    @property
    def span(self) -> tuple[int, int, int]:
        return int(self.name["p"]), int(self.name["first"]), int(self.name["last"])


def s3_client(url: str) -> Any:
    return aioboto3.Session(**AWS).client("s3", endpoint_url=url)


async def keys(url: str, bucket: str, prefix: str = "") -> list[str]:
    async with s3_client(url) as s3:
        out = []
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return out


async def archived(url: str, bucket: str, prefix: str = "") -> list[Obj]:
    """Every data object of the bucket, decompressed as its Content-Encoding says."""
    out = []
    async with s3_client(url) as s3:
        for key in await keys(url, bucket, prefix):
            if not KEY.match(key):
                continue
            got = await s3.get_object(Bucket=bucket, Key=key)
            body = await got["Body"].read()
            encoding = got.get("ContentEncoding")
            raw = (gzip.decompress(body) if encoding == "gzip"
                   else zstandard.ZstdDecompressor().decompressobj().decompress(body) if encoding == "zstd" else body)
            out.append(Obj(key, got["Metadata"], got["ContentType"], encoding, got["ETag"], len(body), raw))
    return out


async def archived_ends(url: str, bucket: str) -> dict[int, int]:
    """Per partition, the offset after the highest archived one (names only: cheap to poll)."""
    ends: dict[int, int] = {}
    for key in await keys(url, bucket):
        m = KEY.match(key)
        if m:
            p = int(m["p"])
            ends[p] = max(ends.get(p, 0), int(m["last"]) + 1)
    return ends


async def kafka_ends(catalog: Catalog, collection: str) -> dict[int, int]:
    ends: dict[int, int] = {}
    for r in await read_to_end(catalog.kafka, collection, timeout=60):
        ends[r.partition] = max(ends.get(r.partition, 0), r.offset + 1)
    return ends


async def wait_archived(url: str, bucket: str, ends: dict[int, int], timeout: float = 60) -> None:  # noqa: ASYNC109 - a deadline for wait_for_async
    async def caught_up() -> bool:
        got = await archived_ends(url, bucket)
        return all(got.get(p, 0) >= end for p, end in ends.items())

    await wait_for_async(caught_up, timeout=timeout, interval=0.3, message=f"archive reaching offsets {ends}",
                         ignore=(ClientError,))  # NoSuchBucket until the task re-creates it


def assert_exactly_once(objects: list[Obj], expected_ids: set[str]) -> None:
    """Each object matches its metadata; offsets never overlap; every id is there exactly once."""
    ids: Counter[str] = Counter()
    spans: dict[int, list[tuple[int, int]]] = {}
    for o in objects:
        assert hashlib.sha256(o.raw).hexdigest() == o.metadata["sha256"], o.key
        assert o.metadata["documents"] == str(len(o.lines)), o.key
        p, first, last = o.span
        assert len(o.lines) == last - first + 1, o.key
        spans.setdefault(p, []).append((first, last))
        ids.update(orjson.loads(line)["id"] for line in o.lines)
    for p, ranges in spans.items():
        ranges.sort()
        for (_, a_last), (b_first, _) in zip(ranges, ranges[1:], strict=False):
            assert b_first == a_last + 1, f"partition {p}: objects overlap or leave a hole: {ranges}"
    doubled = [i for i, n in ids.items() if n > 1]
    assert not doubled, f"{len(doubled)} documents archived more than once, e.g. {doubled[:5]}"
    missing = expected_ids - set(ids)
    assert not missing, f"{len(missing)} documents never archived, e.g. {sorted(missing)[:5]}"
    assert set(ids) == expected_ids


def counter(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def iso_ms(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


# ------------------------------------------------------------------ names, compression, metadata


@pytest.mark.parametrize(("compression", "encoding", "extension"),
                         [("gzip", "gzip", ".gz"), ("zstd", "zstd", ".zst"), ("none", None, None)])
async def test_objects_are_named_compressed_and_described_by_their_metadata(
        env: Env, unique_name: Callable[..., str], compression: str, encoding: str | None,
        extension: str | None) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 2}, {"compression": compression, "max_documents": 40})
    await produce(cat, coll, docs("d", 100))
    records = await read_to_end(cat.kafka, coll)
    applied: list[Applied] = []
    await archive(cat, coll, records, partitions=2, applied=applied)

    objects = await archived(env.s3, env.bucket)
    by_offset = {(r.partition, r.offset): r for r in records}
    assert sum(len(o.lines) for o in objects) == 100
    for o in objects:
        p, first, last = o.span
        head, tail = by_offset[(p, first)], by_offset[(p, last)]
        assert o.name["base"] == f"{PREFIX}{coll}/" and o.name["ext"] == extension
        hour = datetime.fromtimestamp(head.timestamp_ms / 1000, UTC)
        assert (o.name["date"], o.name["hour"]) == (hour.strftime("%Y-%m-%d"), hour.strftime("%H"))
        assert (o.content_type, o.encoding) == ("application/x-ndjson", encoding)
        assert o.metadata["documents"] == str(last - first + 1)
        assert iso_ms(o.metadata["first-timestamp"]) == head.timestamp_ms
        assert iso_ms(o.metadata["last-timestamp"]) == tail.timestamp_ms
        assert o.metadata["sha256"] == hashlib.sha256(o.raw).hexdigest()
        assert [orjson.loads(line) for line in o.lines] == [
            orjson.loads(by_offset[(p, off)].value) for off in range(first, last + 1)]
    assert sum(a.stored_bytes.get(0, 0) for a in applied) == sum(o.size for o in objects), "for localflow_archive_bytes"
    assert sum(a.documents.get(0, 0) for a in applied) == 100


async def test_batches_are_cut_at_max_documents(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_documents": 100, "max_age": "1h"})
    await produce(cat, coll, docs("d", 250))
    m = await started(cat)
    await m.assigned(tps(coll))

    durable = (await m.apply(Batch(await read_to_end(cat.kafka, coll), {coll: 0}))).offsets

    assert durable == {TopicPartition(coll, 0): 200}
    assert sorted(o.span for o in await archived(env.s3, env.bucket)) == [(0, 0, 99), (0, 100, 199)]
    await m.close(failed=True)


async def overlapped(env: Env, unique_name: Callable[..., str], n: int) -> tuple[str, Catalog, list[Record], Any]:
    """A started, assigned archive with overlap of a 1-partition collection of ``n`` documents, objects
    of 100: (collection, catalog, its records, the materialization)."""
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_documents": 100, "max_age": "1h"}, overlap=True)
    await produce(cat, coll, docs("d", n))
    records = await read_to_end(cat.kafka, coll)
    m = await started(cat)
    await m.assigned(tps(coll))
    return coll, cat, records, m


async def test_with_overlap_objects_upload_while_apply_returns_and_the_next_call_reports_them(
        env: Env, unique_name: Callable[..., str]) -> None:
    """``advanced.overlap`` (the default): ``apply`` starts the uploads and returns; the next call
    reports what they made durable; a partition holding more than two sealed objects not yet
    uploaded makes ``apply`` wait for them (back-pressure)."""
    coll, cat, records, m = await overlapped(env, unique_name, 450)
    tp = TopicPartition(coll, 0)
    try:
        assert (await m.apply(Batch(records[:150], {coll: 0}))).offsets == {}  # uploading
        assert (await m.tick()).offsets == {tp: 100}
        assert (await m.apply(Batch(records[150:210], {coll: 0}))).offsets == {}  # 100-199: uploading
        waited = await m.apply(Batch(records[210:], {coll: 0}))  # seals 200-299, 300-399: three not uploaded
        assert waited.offsets == {tp: 400}
        assert sorted(o.span for o in await archived(env.s3, env.bucket)) == [
            (0, 0, 99), (0, 100, 199), (0, 200, 299), (0, 300, 399)]
        assert (await m.close(failed=False)).offsets == {tp: 450}
    except BaseException:
        await m.close(failed=True)
        raise


async def test_a_revoke_waits_for_the_upload_in_flight_and_a_new_owner_resumes_after_it(
        env: Env, unique_name: Callable[..., str]) -> None:
    coll, cat, records, m = await overlapped(env, unique_name, 250)
    tp = TopicPartition(coll, 0)
    assert (await m.apply(Batch(records, {coll: 0}))).offsets == {}  # two objects uploading
    await m.revoked(tps(coll))  # and the open batch of 50 flushed
    assert sorted(o.span for o in await archived(env.s3, env.bucket)) == [(0, 0, 99), (0, 100, 199), (0, 200, 249)]
    await m.close(failed=False)
    assert await archive(cat, coll, []) == {tp: 250}


async def test_batches_are_cut_at_max_bytes(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_bytes": 2048, "max_age": "1h"})
    await produce(cat, coll, docs("d", 60, pad=200))
    await archive(cat, coll, await read_to_end(cat.kafka, coll), failed=True)

    objects = await archived(env.s3, env.bucket)
    assert len(objects) >= 5
    for o in objects:
        assert 2048 <= len(o.raw) < 2048 + 300, f"{o.key} holds {len(o.raw)} bytes of JSON lines"


async def test_open_batch_is_uploaded_once_max_age_passes(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_age": "300ms"})
    await produce(cat, coll, docs("d", 10))
    m = await started(cat)
    await m.assigned(tps(coll))

    assert (await m.apply(Batch(await read_to_end(cat.kafka, coll), {coll: 0}))).offsets == {}
    durable = (await wait_for_async(m.tick, timeout=10, message="tick() uploading the aged batch")).offsets

    assert durable == {TopicPartition(coll, 0): 10}
    assert [o.span for o in await archived(env.s3, env.bucket)] == [(0, 0, 9)]
    await m.close(failed=False)


async def test_close_uploads_open_batches_unless_the_task_failed(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_age": "1h"})
    await produce(cat, coll, docs("d", 30))
    records = await read_to_end(cat.kafka, coll)
    failed = await started(cat)
    await failed.assigned(tps(coll))
    await failed.apply(Batch(records, {coll: 0}))
    assert (await failed.close(failed=True)).offsets == {}
    assert await archived(env.s3, env.bucket) == []

    m = await started(cat)
    await m.assigned(tps(coll))
    await m.apply(Batch(records, {coll: 0}))
    assert (await m.close(failed=False)).offsets == {TopicPartition(coll, 0): 30}
    assert [o.span for o in await archived(env.s3, env.bucket)] == [(0, 0, 29)]


async def test_large_batches_use_multipart_upload(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"compression": "none", "max_documents": 100_000},
                      endpoint={"advanced": {"multipart_threshold": 5 * 2**20, "part_size": 5 * 2**20}})
    await produce(cat, coll, docs("d", 6000, pad=1000))
    await archive(cat, coll, await read_to_end(cat.kafka, coll))

    [o] = await archived(env.s3, env.bucket)
    assert o.etag.strip('"').endswith("-2"), f"ETag {o.etag} is not a two-part upload's"
    assert len(o.lines) == 6000 and o.metadata["sha256"] == hashlib.sha256(o.raw).hexdigest()


async def test_non_json_record_is_dead_lettered_and_left_as_a_gap(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_age": "1h"})
    now = ms("2026-11-28T10:00:00")
    await produce_at(cat, coll, [(b'{"id":"a"}', now), (b"not json", now), (b'{"id":"b"}', now)])
    await archive(cat, coll, await read_to_end(cat.kafka, coll))

    [o] = await archived(env.s3, env.bucket)
    assert o.span == (0, 0, 2) and o.lines == [b'{"id":"a"}', b'{"id":"b"}']
    assert (o.metadata["documents"], o.metadata["gaps"]) == ("2", "1-1")
    [dead] = await read_to_end(cat.kafka, f"{coll}.dead")
    assert orjson.loads(dead.value)["original"] == "not json"
    seen: list[int] = []
    report = await verify_binding(*binding_of(cat), lambda p, offset, line: seen.append(offset))
    assert report.ok and seen == [0, 2]


# ------------------------------------------------------------------ resume, replay, versions


async def test_resume_starts_after_the_last_archived_object(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 2}, {"max_documents": 100})
    await produce(cat, coll, docs("d", 300))
    await archive(cat, coll, await read_to_end(cat.kafka, coll), partitions=2)
    ends = await archived_ends(env.s3, env.bucket)

    second = await started(cat)
    resumed = await second.assigned(tps(coll, 2))
    await second.close(failed=False)

    assert resumed == {TopicPartition(coll, p): ends[p] for p in (0, 1)}
    assert sum(ends.values()) == 300


async def test_resume_finds_an_object_uploaded_after_a_stale_marker(env: Env, unique_name: Callable[..., str]) -> None:
    """A crash between an upload and its marker: the listing after the marker finds the object,
    also when it lies in a later hour."""
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_documents": 50})
    await produce_at(cat, coll, [(orjson.dumps({"id": f"a{i}"}), ms("2026-01-01T05:10:00")) for i in range(50)]
                     + [(orjson.dumps({"id": f"b{i}"}), ms("2026-01-01T08:10:00")) for i in range(50)])
    records = await read_to_end(cat.kafka, coll)
    marker = f"{PREFIX}_localflow/{coll}/p=0.json"
    m = await started(cat)
    await m.assigned(tps(coll))
    await m.apply(Batch(records[:50], {coll: 0}))
    async with s3_client(env.s3) as s3:
        stale = await (await s3.get_object(Bucket=env.bucket, Key=marker))["Body"].read()
        await m.apply(Batch(records[50:], {coll: 0}))
        await s3.put_object(Bucket=env.bucket, Key=marker, Body=stale)  # as if the crash came before it
    await m.close(failed=True)

    resumed = await (second := await started(cat)).assigned(tps(coll))
    await second.close(failed=False)

    assert resumed == {TopicPartition(coll, 0): 100}
    assert sorted(o.name["hour"] for o in await archived(env.s3, env.bucket)) == ["05", "08"]


async def test_hours_never_go_back_within_a_partition(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_documents": 10})
    await produce_at(cat, coll, [(orjson.dumps({"id": f"a{i}"}), ms("2026-01-01T10:00:00")) for i in range(10)]
                     + [(orjson.dumps({"id": f"b{i}"}), ms("2026-01-01T07:00:00")) for i in range(10)])
    await archive(cat, coll, await read_to_end(cat.kafka, coll))

    hours = [(o.span[1], o.name["hour"]) for o in await archived(env.s3, env.bucket)]
    assert sorted(hours) == [(0, "10"), (10, "10")]


async def test_replayed_offsets_are_trimmed_not_archived_twice(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_documents": 100})
    await produce(cat, coll, docs("d", 150))
    records = await read_to_end(cat.kafka, coll)
    await archive(cat, coll, records[:100], failed=True)

    resumed = await archive(cat, coll, records)  # a replay from offset 0

    assert resumed == {TopicPartition(coll, 0): 100}
    objects = await archived(env.s3, env.bucket)
    assert sorted(o.span for o in objects) == [(0, 0, 99), (0, 100, 149)]
    assert_exactly_once(objects, {f"d-{i}" for i in range(150)})


async def test_backfill_counter_archives_again_under_a_new_version_path(
        env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1})
    await produce(cat, coll, docs("d", 20))
    records = await read_to_end(cat.kafka, coll)
    await archive(cat, coll, records)

    resumed = await archive(env.catalog({coll: 1}, {"backfill": 1}, file="backfill.yaml"), coll, records)

    assert resumed == {TopicPartition(coll, 0): None}
    versions = {(o.name["version"], len(o.lines)) for o in await archived(env.s3, env.bucket)}
    assert versions == {(None, 20), ("0001", 20)}
    assert all(k.startswith(f"{PREFIX}{coll}/v0001/") for k in await keys(env.s3, env.bucket, f"{PREFIX}{coll}/v"))


# ------------------------------------------------------------------ bucket and lifecycle


async def test_retention_days_becomes_a_lifecycle_rule_on_the_prefix(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    foreign = {"ID": "someone else's", "Filter": {"Prefix": "other/"}, "Status": "Enabled", "Expiration": {"Days": 7}}
    async with s3_client(env.s3) as s3:
        await s3.create_bucket(Bucket=env.bucket)
        await s3.put_bucket_lifecycle_configuration(Bucket=env.bucket, LifecycleConfiguration={"Rules": [foreign]})
        m = await started(env.catalog({coll: 1}, {"retention_days": 30}, endpoint={"create_bucket": False}))
        await m.close(failed=False)
        rules = (await s3.get_bucket_lifecycle_configuration(Bucket=env.bucket))["Rules"]

    expiring = {r["Filter"]["Prefix"]: r["Expiration"]["Days"] for r in rules}
    assert expiring == {"other/": 7, f"{PREFIX}{coll}/": 30}


async def test_missing_bucket_is_an_error_that_names_it(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    with pytest.raises(ConfigError, match=env.bucket) as failure:
        await started(env.catalog({coll: 1}, endpoint={"create_bucket": False}))
    assert "create_bucket: true" in str(failure.value)


async def test_missing_bucket_is_created_when_allowed(env: Env, unique_name: Callable[..., str]) -> None:
    m = await started(env.catalog({unique_name("c"): 1}, endpoint={"create_bucket": True}))
    await m.close(failed=False)
    async with s3_client(env.s3) as s3:
        await s3.head_bucket(Bucket=env.bucket)


async def test_doctor_checks_the_bucket_and_never_prints_secrets(env: Env, unique_name: Callable[..., str]) -> None:
    secret = unique_name("secret")
    key_id = unique_name("AKIA")
    async with s3_client(env.s3) as s3:
        await s3.create_bucket(Bucket=env.bucket)
    doctor = load_connector("s3").doctor
    assert doctor is not None

    def config(bucket: str, url: str) -> S3Config:
        return S3Config(bucket=bucket, endpoint_url=url, aws_access_key_id=key_id, aws_secret_access_key=secret)

    [ok] = await doctor(config(env.bucket, env.s3))
    [missing] = await doctor(config(unique_name("missing", sep="-"), env.s3))
    [down] = await doctor(config(env.bucket, f"http://127.0.0.1:{free_port()}"))

    assert ok.ok and not missing.ok and not down.ok
    assert "does not exist" in missing.detail and "unreachable" in down.detail
    for check in (ok, missing, down):
        assert secret not in f"{check.name} {check.detail}" and key_id not in f"{check.name} {check.detail}"


# ------------------------------------------------------------------ fencing and overlaps


@pytest.mark.parametrize("conditional_writes", [True, False])
async def test_replaced_worker_is_fenced_before_it_uploads(
        env: Env, unique_name: Callable[..., str], conditional_writes: bool) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 1}, {"max_documents": 100},
                      endpoint={"advanced": {"conditional_writes": conditional_writes}})
    await produce(cat, coll, docs("d", 150))
    records = await read_to_end(cat.kafka, coll)
    zombie = await started(cat)
    await zombie.assigned(tps(coll))
    await zombie.apply(Batch(records[:50], {coll: 0}))  # buffered, not uploaded

    await archive(cat, coll, records)
    with pytest.raises(Fenced):
        await zombie.apply(Batch(records[50:], {coll: 0}))
    await zombie.close(failed=True)

    assert_exactly_once(await archived(env.s3, env.bucket), {f"d-{i}" for i in range(150)})


async def test_verify_reads_overlapping_objects_once_by_offset(env: Env, unique_name: Callable[..., str]) -> None:
    """The window S3 cannot close: the old owner's check passed just before the new owner
    claimed (simulated by putting its claim back), so both upload overlapping offsets."""
    coll = unique_name("c")
    base = env.catalog({coll: 1})
    await produce(base, coll, docs("d", 150))
    records = await read_to_end(base.kafka, coll)
    marker = f"{PREFIX}_localflow/{coll}/p=0.json"
    zombie = await started(env.catalog({coll: 1}, {"max_documents": 1000}, file="zombie.yaml"))
    await zombie.assigned(tps(coll))
    await zombie.apply(Batch(records, {coll: 0}))
    async with s3_client(env.s3) as s3:
        claim = await (await s3.get_object(Bucket=env.bucket, Key=marker))["Body"].read()
        owner = await started(env.catalog({coll: 1}, {"max_documents": 100}, file="owner.yaml"))
        await owner.assigned(tps(coll))
        await owner.apply(Batch(records, {coll: 0}))
        await owner.close(failed=True)
        await s3.put_object(Bucket=env.bucket, Key=marker, Body=claim)
        await zombie.close(failed=False)
    seen: list[int] = []
    report = await verify_binding(*binding_of(base), lambda p, offset, line: seen.append(offset))

    assert sorted(o.span for o in await archived(env.s3, env.bucket)) == [(0, 0, 99), (0, 0, 149)]
    assert len(report.overlaps) == 1 and report.duplicates == 100 and not report.problems
    assert report.documents == 150 and seen == list(range(150))


# ------------------------------------------------------------------ the running task: stop, outages, kill -9


async def test_stopping_uploads_open_batches(env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    task = f"s3/{coll}"
    cat = env.catalog({coll: 2}, {"max_age": "1h"}, task=task, overlap=True)
    await produce(cat, coll, docs("d", 300))
    async with running(cat, task, options={"reader": READER}, stop_within=60):
        await wait_for_async(lambda: counter("localflow_input_documents_total", {"task": task, "collection": coll}) >= 300,
                             timeout=60, message="the task reading all 300 documents")
        assert await archived(env.s3, env.bucket) == []

    assert_exactly_once(await archived(env.s3, env.bucket), {f"d-{i}" for i in range(300)})


def outage_catalog(env: Env, coll: str, task: str) -> Catalog:
    return env.catalog({coll: 2}, {"max_documents": 200, "max_age": "300ms"}, task=task, overlap=True, endpoint={
        "create_bucket": True,
        "advanced": {"connect_timeout": "1s", "request_timeout": "2s", "retry": {"max_backoff": "1s"}}})


OUTAGES = [pytest.param(4.0, id="4s"), pytest.param(30.0, id="30s", marks=pytest.mark.chaos)]


@pytest.mark.parametrize("outage", OUTAGES)
async def test_archive_catches_up_after_s3_restarts_empty(
        kafka_bootstrap: str, fresh_services: Callable[..., Services], unique_name: Callable[..., str],
        tmp_path: Path, outage: float) -> None:
    """moto keeps nothing across a restart, so the archive after it is a new bucket (create_bucket):
    it must hold every offset from the outage on, exactly once, with the task never restarted."""
    s3: S3 = fresh_services(s3=True).s3
    env = Env(kafka_bootstrap, s3.endpoint_url, unique_name("b", sep="-"), tmp_path)
    coll = unique_name("c")
    task = f"s3/{coll}"
    cat = outage_catalog(env, coll, task)
    async with running(cat, task, options={"reader": READER}, stop_within=60):
        await produce(cat, coll, docs("before", 600))
        before = await kafka_ends(cat, coll)
        await wait_archived(env.s3, env.bucket, before)
        errors = counter("localflow_errors_total", {"task": task, "kind": "endpoint"})

        s3.stop()
        await produce(cat, coll, docs("during", 600))
        await wait_for_async(lambda: counter("localflow_errors_total", {"task": task, "kind": "endpoint"}) > errors,
                             timeout=30, message="the task retrying against the stopped S3")
        await asyncio.sleep(outage)  # the outage itself
        s3.start()
        await produce(cat, coll, docs("after", 600))
        after = await kafka_ends(cat, coll)
        await wait_archived(env.s3, env.bucket, after, timeout=60 + outage)
        assert STATUS[task].restarts == 0 and STATUS[task].running

    objects = await archived(env.s3, env.bucket)
    assert {p: min(o.span[1] for o in objects if o.span[0] == p) for p in before} == before
    assert_exactly_once(objects, {f"{tag}-{i}" for tag in ("during", "after") for i in range(600)})


@pytest.mark.parametrize("outage", OUTAGES)
async def test_archive_catches_up_after_s3_freezes(
        kafka_bootstrap: str, fresh_services: Callable[..., Services], unique_name: Callable[..., str],
        tmp_path: Path, outage: float) -> None:
    """SIGSTOP keeps moto's state: requests hang and time out, late ones land after SIGCONT;
    the whole archive still holds every document exactly once."""
    s3: S3 = fresh_services(s3=True).s3
    env = Env(kafka_bootstrap, s3.endpoint_url, unique_name("b", sep="-"), tmp_path)
    coll = unique_name("c")
    task = f"s3/{coll}"
    cat = outage_catalog(env, coll, task)
    pid = s3.pid
    assert pid is not None
    async with running(cat, task, options={"reader": READER}, stop_within=60):
        await produce(cat, coll, docs("before", 600))
        await wait_archived(env.s3, env.bucket, await kafka_ends(cat, coll))
        errors = counter("localflow_errors_total", {"task": task, "kind": "endpoint"})

        os.kill(pid, signal.SIGSTOP)
        try:
            await produce(cat, coll, docs("during", 600))
            await wait_for_async(
                lambda: counter("localflow_errors_total", {"task": task, "kind": "endpoint"}) > errors,
                timeout=60, message="the task retrying against the frozen S3")
            await asyncio.sleep(outage)  # the outage itself
        finally:
            os.kill(pid, signal.SIGCONT)
        await produce(cat, coll, docs("after", 600))
        await wait_archived(env.s3, env.bucket, await kafka_ends(cat, coll), timeout=60 + outage)
        assert STATUS[task].restarts == 0 and STATUS[task].running

    assert_exactly_once(await archived(env.s3, env.bucket),
                        {f"{tag}-{i}" for tag in ("before", "during", "after") for i in range(600)})


async def test_every_document_is_archived_exactly_once_across_kill_9(
        env: Env, unique_name: Callable[..., str]) -> None:
    coll = unique_name("c")
    cat = env.catalog({coll: 3}, {"max_documents": 1000, "max_age": "1s"}, task="kill9", overlap=True)
    total, chunk = 100_000, 2000
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    async def producing() -> None:
        for start in range(0, total, chunk):
            await produce(cat, coll, [{"id": f"d-{i}", "n": i, "pad": "x" * 100} for i in range(start, start + chunk)])
            await asyncio.sleep(0.5)  # spread the stream over the kills

    async def owned_by(pid: int) -> bool:
        async with s3_client(env.s3) as s3:
            for p in range(3):
                try:
                    got = await s3.get_object(Bucket=env.bucket, Key=f"{PREFIX}_localflow/{coll}/p={p}.json")
                except s3.exceptions.NoSuchKey:
                    continue
                if f":{pid}:" in orjson.loads(await got["Body"].read())["owner"]:
                    return True
        return False

    def spawn(log: Path) -> Worker:
        return task_worker(cat.path, "kill9", log)

    log = env.tmp / "worker.log"
    producer = asyncio.create_task(producing())
    kills = 0
    proc: Worker | None = None
    try:
        while kills < 6:
            proc = spawn(log)
            await wait_for_async(lambda p=proc.pid: owned_by(p), timeout=60, interval=0.2, ignore=(ClientError,),
                                 message=f"worker {proc.pid} claiming a partition (seed {seed})")
            await asyncio.sleep(rng.uniform(0.0, 2.0))  # a random point of its work
            proc.kill()
            kills += 1
        await producer
        ends = await kafka_ends(cat, coll)
        assert sum(ends.values()) == total
        proc = spawn(log)
        await wait_archived(env.s3, env.bucket, ends, timeout=180)
        proc.assert_exit(proc.stop(timeout=60))
    finally:
        producer.cancel()
        if proc is not None:
            proc.kill()

    assert_exactly_once(await archived(env.s3, env.bucket), {f"d-{i}" for i in range(total)})
