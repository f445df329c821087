"""What every stage of the Sophia pipeline holds, counted independently of the code under test.

``Census`` reads the topics and dead-letter topics (to their high watermark; each look fetches
only what is new), Postgres rows, Redis keys and S3 objects (decompressed; each line's Kafka
offset from the object's name and `gaps` metadata).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aioboto3
import asyncpg
import orjson
from redis.asyncio import Redis

from connectors.s3.verify import decompress
from pipeline.runtime.catalog import KafkaConfig
from pipeline.runtime.collection import read_to_end
from pipeline.sdk.errors import EndpointError
from pipeline.sdk.records import Record
from tests.support.pipeline import (
    COLLECTIONS,
    PG_SCHEMA,
    PG_TABLES,
    PROCESSED,
    REDIS_PREFIXES,
    REDIS_STREAM,
    S3_BUCKET,
    S3_PREFIX,
    topic,
)


@dataclass
class TopicContent:
    """A collection's topic and dead-letter topic, read to their high watermarks."""

    messages: list[tuple[int, int, Any, dict[str, Any] | None]] = field(default_factory=list)
    """(partition, offset, key value, document or None when not a JSON object)."""
    dead: list[dict[str, Any]] = field(default_factory=list)
    """Dead-letter envelopes."""

    @property
    def keys(self) -> set[Any]:
        return {k for _, _, k, _ in self.messages}

    def offsets(self) -> set[tuple[int, int]]:
        return {(p, o) for p, o, _, d in self.messages if d is not None}

    def dead_from(self, task: str) -> list[dict[str, Any]]:
        return [d for d in self.dead if d.get("task") == task]


def _key_value(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        values = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    return values[0] if isinstance(values, list) and len(values) == 1 else orjson.dumps(values).decode()


async def _read_to_end_retried(kafka: KafkaConfig, name: str, from_offsets: dict[int, int]) -> list[Record]:
    """`read_to_end`, again with a fresh consumer when one stalls: right after a Tansu restart on S3
    storage a partition's fetch can stay empty below its high watermark for one consumer's life."""
    for attempt in range(3):
        try:
            return await read_to_end(kafka, name, timeout=30, from_offsets=from_offsets)
        except EndpointError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _read_new(kafka: KafkaConfig, collection: str, content: TopicContent,
                    nexts: dict[str, dict[int, int]]) -> None:
    """Append to `content` what the collection and its dead letters got past `nexts` (topic ->
    partition -> next offset, advanced here), so a census of a growing topic reads each record once."""
    for name, dead in ((topic(collection), False), (topic(collection) + ".dead", True)):
        seen = nexts.setdefault(name, {})
        for r in await _read_to_end_retried(kafka, name, seen):
            seen[r.partition] = r.offset + 1
            if dead:
                content.dead.append(orjson.loads(r.value))
                continue
            try:
                doc = orjson.loads(r.value)
            except orjson.JSONDecodeError:
                doc = None
            content.messages.append((r.partition, r.offset, _key_value(r.key), doc if isinstance(doc, dict) else None))


def dead_key(envelope: dict[str, Any], collection: str) -> Any:
    """The collection key of the document a dead letter holds (its original bytes), or its text."""
    original = envelope.get("original")
    try:
        doc = orjson.loads(original) if original is not None else None
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        if collection == PROCESSED:
            return doc.get("id")
        meta = doc.get("metadata")
        if isinstance(meta, dict) and "id" in meta:
            return meta["id"]
    return original if original is not None else envelope.get("original_base64")


@dataclass
class ArchivedObject:
    partition: int
    offsets: list[int]
    keys: list[Any]


_OBJECT = re.compile(r"/dt=\d{4}-\d{2}-\d{2}/hr=\d{2}/p=(\d+)/(\d{20})-(\d{20})\.jsonl(\.gz|\.zst)?$")


class ArchiveReader:
    """Reads the S3 archive back, object by object (cached: a data object never changes once named)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._cache: dict[tuple[str, str], ArchivedObject] = {}

    async def read(self, collection: str, key_of: Callable[[dict[str, Any]], Any]) -> list[ArchivedObject]:
        prefix = f"{S3_PREFIX}{collection}/"
        session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
        out = []
        async with session.client("s3", endpoint_url=self.endpoint) as s3:
            listed: list[tuple[str, str]] = []
            try:
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
                    listed += [(o["Key"], o["ETag"]) for o in page.get("Contents", [])]
            except s3.exceptions.NoSuchBucket:
                return []
            for key, etag in listed:
                m = _OBJECT.search(key)
                if m is None:
                    continue
                cached = self._cache.get((key, etag))
                if cached is None:
                    got = await s3.get_object(Bucket=S3_BUCKET, Key=key)
                    async with got["Body"] as body:
                        data = await body.read()
                    raw = decompress(data, got.get("ContentEncoding"))
                    lines = raw.split(b"\n")[:-1] if raw else []
                    first, last = int(m.group(2)), int(m.group(3))
                    skipped: set[int] = set()
                    for gap in filter(None, got.get("Metadata", {}).get("gaps", "").split(",")):
                        lo, _, hi = gap.partition("-")
                        skipped.update(range(int(lo), int(hi) + 1))
                    offsets = [o for o in range(first, last + 1) if o not in skipped]
                    if len(offsets) != len(lines):
                        raise AssertionError(f"s3://{S3_BUCKET}/{key}: {len(lines)} lines for {len(offsets)} offsets")
                    cached = ArchivedObject(int(m.group(1)), offsets, [key_of(orjson.loads(x)) for x in lines])
                    self._cache[(key, etag)] = cached
                out.append(cached)
        return out


def doc_key(collection: str) -> Callable[[Any], Any]:
    """The key of an archived line's document (None when it is not a keyed object)."""
    def key(doc: Any) -> Any:
        if not isinstance(doc, dict):
            return None
        if collection == PROCESSED:
            return doc.get("id")
        meta = doc.get("metadata")
        return meta.get("id") if isinstance(meta, dict) else None
    return key


@dataclass
class Endpoints:
    """What the materializations hold."""

    postgres: dict[str, list[Any]] = field(default_factory=dict)
    """collection -> key column values, one per row."""
    redis: dict[str, set[str]] = field(default_factory=dict)
    """collection -> ids (keys without their prefix)."""
    s3: dict[str, Counter[tuple[int, int]]] = field(default_factory=dict)
    """collection -> how many times each (partition, offset) is archived."""
    s3_keys: dict[str, set[Any]] = field(default_factory=dict)


class Census:
    """Counts what every stage holds, straight from the servers."""

    def __init__(self, bootstrap: str, postgres_url: str, redis_url: str, s3_endpoint: str) -> None:
        self.bootstrap = bootstrap
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.archive = ArchiveReader(s3_endpoint)
        self._kafka = KafkaConfig(bootstrap_servers=bootstrap)
        self._content = {c: TopicContent() for c in COLLECTIONS}
        self._next: dict[str, dict[int, int]] = {}

    async def topics(self) -> dict[str, TopicContent]:
        """What every collection holds now; only records new since the last look are fetched."""
        for c, content in self._content.items():
            await _read_new(self._kafka, c, content, self._next)
        return {c: TopicContent(messages=list(t.messages), dead=list(t.dead)) for c, t in self._content.items()}

    async def endpoints(self) -> Endpoints:
        out = Endpoints()
        conn = await asyncpg.connect(self.postgres_url, timeout=10)
        try:
            for collection, (table, column) in PG_TABLES.items():
                try:
                    rows = await conn.fetch(f'SELECT "{column}" FROM "{PG_SCHEMA}"."{table}"')
                except asyncpg.UndefinedTableError:
                    rows = []
                out.postgres[collection] = [r[0] for r in rows]
        finally:
            await conn.close()
        redis = Redis.from_url(self.redis_url, socket_timeout=60)
        try:
            for collection, prefix in REDIS_PREFIXES.items():
                ids = set()
                async for key in redis.scan_iter(match=_glob_escape(prefix) + "*", count=2000):
                    text = key.decode()
                    if text != REDIS_STREAM:
                        ids.add(text[len(prefix):])
                out.redis[collection] = ids
        finally:
            await redis.aclose()
        for collection in COLLECTIONS:
            objects = await self.archive.read(collection, doc_key(collection))
            counts: Counter[tuple[int, int]] = Counter()
            keys: set[Any] = set()
            for o in objects:
                counts.update((o.partition, off) for off in o.offsets)
                keys.update(o.keys)
            out.s3[collection] = counts
            out.s3_keys[collection] = keys
        return out


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
