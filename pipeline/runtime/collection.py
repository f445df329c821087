"""Collections on Kafka: a compiled view of a collection, a validating writer, a batch reader.

Wire format (SPEC "Vocabulary"): message key = the document's key values as a JSON array,
value = the document, both orjson bytes; headers ``localflow-task`` (the writer) and
``localflow-schema`` (the schema fingerprint), and on a derived document ``localflow-source``
(the source position it came from, see ``Record.source``). Invalid documents go to
``<topic>.dead`` as a JSON envelope; they never stop the writer, and neither does a document
larger than the broker accepts (``kafka.max_message_bytes``): it becomes a dead letter that fits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import reprlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from murmurhash2 import murmurhash2 as _murmurhash2

from pipeline.runtime.catalog import Catalog, KafkaConfig, schema_fingerprint, topic_of
from pipeline.sdk.errors import EndpointError, OffsetGap, ValidationFailed
from pipeline.sdk.pointers import MISSING, pointer_tokens, resolve
from pipeline.sdk.records import SCHEMA_HEADER, SOURCE_HEADER, Record
from pipeline.telemetry import metrics

log = logging.getLogger("localflow.collection")

TASK_HEADER = "localflow-task"
"""``<topic>:<partition>:<offset>`` of the source record a derived document came from."""
DEAD_SUFFIX = ".dead"
RECORD_OVERHEAD = 1024
"""Bytes of a record's limit kept for what is not key or value: batch and record framing and headers
(Kafka's ``message.max.bytes`` counts the whole batch)."""
KEEP_FOREVER = "-1"
_RECORD_FRAMING = 128
"""More than a batch header (61 bytes) and a record's own framing (varints, at most ~40 bytes) take:
below this plus key, value and headers, a record surely fits ``max_request_size``."""


def compile_schema(schema: dict[str, Any]) -> Any:
    """A validator for ``schema`` in the dialect it declares (2020-12 when none), formats asserted:
    ``date-time`` is RFC 3339's (``T`` or ``t``, seconds, a ``Z`` or ``+hh:mm`` zone: no space
    separator, no ``+0000``, no date without a time), checked in Rust like every other keyword."""
    return jsonschema_rs.validator_for(schema, validate_formats=True)


_WHY: dict[str, Callable[[Any], str]] = {
    "Type": lambda k: f"must be {' or '.join(str(t) for t in k.types)}",
    "Required": lambda k: f"must contain [{k.property!r}] properties",
    "Format": lambda k: f"must be {k.format}",
    "Enum": lambda k: f"must be one of {k.options!r}",
    "Minimum": lambda k: f"must be bigger than or equal to {k.limit}",
    "Maximum": lambda k: f"must be smaller than or equal to {k.limit}",
}
"""The wording of dead letters for the common keywords (kept from the draft-7 engine, so errors read
as they did); other keywords keep jsonschema-rs's own message."""


def _error_text(e: Any) -> str:
    """``/metadata/id must be string``: where in the document, then what the schema wants there."""
    where = "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in e.instance_path)
    why = _WHY.get(type(e.kind).__name__)
    return f"{where} {why(e.kind) if why else e.message}"


class Collection:
    """One collection: its topic, key pointers and a compiled validator (built once)."""

    __slots__ = ("name", "topic", "dead_topic", "key", "partitions", "replication_factor", "retention", "schema",
                 "fingerprint", "_validator", "_valid", "_paths", "_headers_cache")

    def __init__(self, name: str, schema: dict[str, Any], key: Sequence[str], partitions: int = 1,
                 replication_factor: int = 1, retention: float | None = None) -> None:
        self.name = name
        self.topic = topic_of(name)
        self.dead_topic = self.topic + DEAD_SUFFIX
        self.key = list(key)
        self.partitions = partitions
        self.replication_factor = replication_factor
        self.retention = retention
        """Seconds the broker keeps records; None: forever (the catalog's default)."""
        self.schema = schema
        self.fingerprint = schema_fingerprint(schema)
        self._validator = compile_schema(schema)
        self._valid = self._validator.is_valid
        self._paths = [pointer_tokens(p) for p in self.key]
        self._headers_cache: dict[str, list[tuple[str, bytes]]] = {}

    @classmethod
    def from_catalog(cls, catalog: Catalog, name: str) -> Collection:
        spec = catalog.collections[name]
        return cls(name, catalog.schema(name), spec.key, spec.partitions, spec.replication_factor, spec.retention)

    @property
    def topic_configs(self) -> dict[str, str]:
        """Configs the topic (and its dead-letter topic) is created with: the declared retention,
        else none at all, whatever the broker's default (Apache Kafka's is 7 days): replay and
        rebuilding an endpoint from the collections need every record."""
        ms = KEEP_FOREVER if self.retention is None else str(max(1, round(self.retention * 1000)))
        return {"retention.ms": ms}

    def topics(self) -> dict[str, tuple[int, int, dict[str, str]]]:
        """This collection's topics as ``Admin.ensure`` takes them: the topic and its dead letters."""
        configs = self.topic_configs
        return {self.topic: (self.partitions, self.replication_factor, configs),
                self.dead_topic: (1, self.replication_factor, configs)}

    def validate(self, doc: Any) -> None:
        """Raise ValidationFailed naming the failing place when ``doc`` breaks the schema."""
        try:
            self._validator.validate(doc)
        except jsonschema_rs.ValidationError as e:
            where = _non_finite(doc, "")  # jsonschema-rs sees NaN as null: say what it really is
            if where is not None:
                raise self._not_finite(doc, where) from None
            raise ValidationFailed(f"{self.name}: {_error_text(e)}") from None

    def key_of(self, doc: dict[str, Any]) -> list[Any]:
        """The document's key values, in key order. (``catalog.resolve`` inlined: this runs for every
        document written, and a call per key costs a few percent; keys never cross arrays.)"""
        out = []
        for path in self._paths:
            node: Any = doc
            for token in path:
                node = node.get(token, MISSING) if isinstance(node, dict) else MISSING
                if node is MISSING:
                    raise ValidationFailed(f"{self.name}: key /{'/'.join(path)} is missing")
            out.append(node)
        return out

    def encode(self, doc: dict[str, Any]) -> tuple[bytes, bytes]:
        """Validate and serialize: (key bytes, value bytes)."""
        self._validate_fast(doc)
        value = orjson.dumps(doc)
        if b"null" in value:  # orjson writes NaN and +-Inf as null: never let one pass as a number
            where = _non_finite(doc, "")
            if where is not None:
                raise self._not_finite(doc, where)
        return orjson.dumps(self.key_of(doc)), value

    def _not_finite(self, doc: Any, where: str) -> ValidationFailed:
        return ValidationFailed(f"{self.name}: {where or '/'} is {doc_value(doc, where)!r}, "
                                f"which JSON cannot hold (NaN and infinities are not numbers in JSON)")

    def _validate_fast(self, doc: Any) -> None:
        if not self._valid(doc):  # no error object is built for the common, valid document
            self.validate(doc)  # raises with the readable message

    def headers(self, task: str) -> list[tuple[str, bytes]]:
        h = self._headers_cache.get(task)
        if h is None:
            h = self._headers_cache[task] = [(TASK_HEADER, task.encode()), (SCHEMA_HEADER, self.fingerprint.encode())]
        return h


def murmur2(data: bytes) -> int:
    """Kafka's key hash (the Java client's ``Utils.murmur2``: MurmurHash2, seed 0x9747b28c), from the
    native ``murmurhash2`` (17x Python's: the writer hashes every key it sends)."""
    return _murmurhash2(data, 0x9747B28C)


def partition_for(key: bytes, partitions: Sequence[int]) -> int:
    """The partition Kafka's default partitioner gives ``key`` among ``partitions`` (sorted ids)."""
    return partitions[(_murmurhash2(key, 0x9747B28C) & 0x7FFFFFFF) % len(partitions)]


def _non_finite(node: Any, place: str) -> str | None:
    """The JSON pointer of the first NaN or infinite float in ``node``, if any."""
    if isinstance(node, float):
        return place if node != node or node in (float("inf"), float("-inf")) else None
    if isinstance(node, dict):
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return None
    for k, v in items:
        where = _non_finite(v, f"{place}/{str(k).replace('~', '~0').replace('/', '~1')}")
        if where is not None:
            return where
    return None


def doc_value(doc: Any, pointer: str) -> Any:
    """The value at a JSON pointer of ``doc``, or MISSING (for messages)."""
    return resolve(doc, pointer_tokens(pointer))


def original_bytes(doc: Any) -> bytes:
    """Bytes to keep in a dead letter for a document that could not be written: JSON when it
    serializes, else a bounded repr (a document nested too deep must not crash the writer)."""
    try:
        return orjson.dumps(doc, default=str)
    except (TypeError, orjson.JSONEncodeError, RecursionError):
        pass
    try:  # the stdlib nests deeper than orjson's 255 levels
        return json.dumps(doc, default=str, ensure_ascii=False).encode("utf-8", "replace")
    except (TypeError, ValueError, RecursionError):
        return reprlib.repr(doc).encode()


def collections_of(catalog: Catalog, names: Iterable[str] | None = None) -> dict[str, Collection]:
    """Compiled collections of a catalog (all, or the named ones)."""
    return {n: Collection.from_catalog(catalog, n) for n in (names if names is not None else catalog.collections)}


MAX_ERROR_CHARS = 4096


def dead_letter(*, error: str, task: str, collection: str, original: bytes, limit: int | None = None,
                **context: Any) -> bytes:
    """The dead-letter envelope: what failed, where, why, and the original bytes, stored once.

    ``original`` holds them as text when they are UTF-8, else ``original_base64`` does;
    ``original_size`` and ``original_sha256`` describe the whole original. When the envelope
    would exceed ``limit`` bytes, the original is cut (``original_truncated``) so that it fits:
    a dead letter the broker refuses would stop its task as surely as the document did.
    """
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + f"... ({len(error)} characters)"
    envelope: dict[str, Any] = {
        "error": error,
        "task": task,
        "collection": collection,
        "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "original_size": len(original),
        "original_sha256": hashlib.sha256(original).hexdigest(),
        **context,
    }
    try:
        text: str | None = original.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    value = _envelope(envelope, original, text is not None)
    if limit is None or len(value) <= limit:
        return value
    envelope["original_truncated"] = True
    room = limit - len(_envelope(envelope, b"", text is not None)) - 64
    while True:  # JSON escapes (up to 6 bytes a character) may need a shorter cut
        cut = original[:max(0, room if text is not None else room * 3 // 4)]
        value = _envelope(envelope, cut, text is not None)
        if len(value) <= limit or room <= 0:
            return value
        room = min(room // 2, room - (len(value) - limit))


def _envelope(envelope: dict[str, Any], original: bytes, as_text: bool) -> bytes:
    if as_text:
        fields = {"original": original.decode("utf-8", "ignore"), "original_base64": None}
    else:
        fields = {"original": None, "original_base64": base64.b64encode(original).decode("ascii")}
    return orjson.dumps({**envelope, **fields}, default=str)


def original_of(envelope: dict[str, Any]) -> bytes:
    """The original bytes a dead-letter envelope holds (cut if ``original_truncated``)."""
    text = envelope.get("original")
    return text.encode() if text is not None else base64.b64decode(envelope.get("original_base64") or "")


def _at(context: dict[str, Any], positions: Sequence[bytes] | None, i: int) -> dict[str, Any]:
    """The dead-letter context of the ``i``-th document of a write (its source position added, if known)."""
    if positions is None:
        return context
    clock, _, offset = positions[i].decode(errors="replace").rpartition(":")
    topic, _, partition = clock.rpartition(":")
    return {**context, "source_position": {"topic": topic, "partition": int(partition) if partition.isdigit() else partition,
                                           "offset": int(offset) if offset.isdigit() else offset}}


@dataclass
class WriteResult:
    written: int = 0
    dead: int = 0
    bytes: int = 0


class Admin:
    """Topic creation on first use (idempotent, cached per process)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self._kafka = kafka
        self._known: set[str] = set()
        self._lock = asyncio.Lock()

    async def ensure(self, topics: dict[str, tuple[int, int, dict[str, str]]]) -> None:
        """Create missing topics: ``{topic: (partitions, replication, configs)}``."""
        missing = {t: v for t, v in topics.items() if t not in self._known}
        if not missing:
            return
        async with self._lock:
            admin = AIOKafkaAdminClient(**self._kafka.client_options())
            try:
                await admin.start()
                existing = set(await admin.list_topics())
                new = [NewTopic(t, p, r, topic_configs=c or None) for t, (p, r, c) in missing.items() if t not in existing]
                if new:
                    try:
                        await admin.create_topics(new)
                    except TopicAlreadyExistsError:
                        pass
                    await self._wait_visible(admin, {n.name for n in new})
            except KafkaError as e:
                raise EndpointError(f"Kafka at {self._kafka.bootstrap_servers}: cannot create topics "
                                    f"{sorted(missing)}: {e!r}") from e
            finally:
                await admin.close()
            self._known.update(missing)

    @staticmethod
    async def _wait_visible(admin: AIOKafkaAdminClient, names: set[str]) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if names <= set(await admin.list_topics()):
                return
            await asyncio.sleep(0.05)


class CollectionWriter:
    """Validates, keys and writes documents into collections; invalid ones become dead letters.

    ``write`` returns only when the broker acknowledged every message of the call, so a task
    may checkpoint right after it (SPEC: "emit nothing without a checkpoint").

    A document whose record would exceed ``kafka.max_message_bytes`` is not sent (the broker
    would refuse it, and the task would fail on the same input at every restart): it becomes a
    dead letter (reason ``too_large``) holding its size, SHA-256, key and position, and as much
    of it as fits.
    """

    def __init__(self, kafka: KafkaConfig, task: str, *, producer_options: dict[str, Any] | None = None) -> None:
        self.kafka = kafka
        self.task = task
        self.admin = Admin(kafka)
        self.max_message_bytes = kafka.max_message_bytes
        self.dead_limit = kafka.max_message_bytes - RECORD_OVERHEAD
        """Largest dead-letter value: the limit, less framing and headers."""
        opts: dict[str, Any] = {"acks": "all", "linger_ms": 5,
                                "max_batch_size": min(256 * 1024, kafka.max_message_bytes),
                                "max_request_size": kafka.max_message_bytes, "enable_idempotence": False}
        opts.update(producer_options or {})
        self.producer = AIOKafkaProducer(**kafka.client_options(), **opts)
        self.max_request_size = opts["max_request_size"]
        self._started = False

    async def start(self) -> None:
        try:
            await self.producer.start()
        except KafkaError as e:
            await self.producer.stop()  # a producer that failed to start still holds its client
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: cannot start producer: {e!r}") from e
        self._started = True

    async def stop(self) -> None:
        if self._started:
            await self.producer.stop()
            self._started = False

    async def __aenter__(self) -> CollectionWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def ensure(self, collections: Iterable[Collection]) -> None:
        """Create each collection's topic and dead-letter topic if missing."""
        topics: dict[str, tuple[int, int, dict[str, str]]] = {}
        for c in collections:
            topics.update(c.topics())
        await self.admin.ensure(topics)

    async def write(self, collection: Collection, docs: Iterable[dict[str, Any]], *,
                    positions: Sequence[bytes] | None = None, **dead_context: Any) -> WriteResult:
        """Write documents and wait for every acknowledgement; invalid and oversized ones go to dead letters.

        ``positions[i]``, when given, is document ``i``'s SOURCE_HEADER (a derivation's outputs: the
        topic, partition and offset of its input); it also goes into that document's dead letter.
        """
        await self.ensure((collection,))
        result = WriteResult()
        futures: list[asyncio.Future[Any]] = []
        headers = collection.headers(self.task)
        budget = self.max_message_bytes - RECORD_OVERHEAD
        topic = collection.topic
        # Partitioned here exactly as Kafka's default partitioner would (same key, same partition),
        # and appended to one record batch per partition (``send_batch``): aiokafka's ``send`` per
        # document costs a partitioner run, a metadata wait and an accumulator lookup each.
        partitions = sorted(await self.producer.partitions_for(topic))
        batches: dict[int, Any] = {}
        fixed = sum(len(k) + len(v) for k, v in headers) + _RECORD_FRAMING
        limit = self.max_request_size
        for i, doc in enumerate(docs):
            try:
                key, value = collection.encode(doc)
            except ValidationFailed as e:
                futures.append(await self._send_dead(collection, str(e), original_bytes(doc),
                                                     _at(dead_context, positions, i)))
                result.dead += 1
                continue
            except (TypeError, orjson.JSONEncodeError, RecursionError) as e:
                futures.append(await self._send_dead(collection, f"not serializable as JSON: {e}",
                                                     original_bytes(doc), _at(dead_context, positions, i)))
                result.dead += 1
                continue
            if len(value) + len(key) > budget:
                futures.append(await self._too_large(collection, doc, key, value,
                                                     _at(dead_context, positions, i)))
                result.dead += 1
                continue
            if positions is None:
                h, size = headers, fixed + len(key) + len(value)
            else:
                h = [*headers, (SOURCE_HEADER, positions[i])]
                size = fixed + len(SOURCE_HEADER) + len(positions[i]) + len(key) + len(value)
            if size > limit and DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, h) > limit:
                # headers larger than the margin: still never a stuck task
                futures.append(await self._too_large(collection, doc, key, value,
                                                     _at(dead_context, positions, i)))
                result.dead += 1
                continue
            partition = partition_for(key, partitions)
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=h) is None:  # full: send it
                futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                batch = batches[partition] = self.producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=h)
            result.written += 1
            result.bytes += len(value)
        for partition, batch in batches.items():
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        await self._acked(futures)
        self._count(collection, result)
        return result

    async def write_dead(self, collection: Collection, error: str, original: bytes, **context: Any) -> None:
        """Dead-letter raw input that never became a document (a line too long, bad bytes)."""
        await self.ensure((collection,))
        await self._acked([await self._send_dead(collection, error, original, context)])
        self._count(collection, WriteResult(dead=1))

    async def _too_large(self, collection: Collection, doc: dict[str, Any], key: bytes, value: bytes,
                         context: dict[str, Any]) -> asyncio.Future[Any]:
        """Dead-letter a document too large to write; where it came from is kept whole, before the
        cut: the writer's ``positions`` entry, else the document's ``metadata`` (a capture's source
        record id and place) when that is small."""
        error = (f"{collection.name}: document of {len(value) + len(key)} bytes is larger than the broker accepts "
                 f"(kafka.max_message_bytes={self.max_message_bytes}, less {RECORD_OVERHEAD} for framing); "
                 f"ask the source for smaller records, or raise the broker's message.max.bytes and "
                 f"kafka.max_message_bytes together")
        context = {**context, "reason": "too_large", "key": key.decode("utf-8", "replace")[:MAX_ERROR_CHARS]}
        meta = doc.get("metadata")
        if "source_position" not in context and isinstance(meta, dict) and len(orjson.dumps(meta)) <= MAX_ERROR_CHARS:
            context["source_position"] = meta
        return await self._send_dead(collection, error, value, context)

    async def _send_dead(self, collection: Collection, error: str, original: bytes,
                         context: dict[str, Any]) -> asyncio.Future[Any]:
        log.warning("dead letter in %s from task %s: %s", collection.dead_topic, self.task, error[:1000])
        reason = context.get("reason", "invalid")
        metrics.DEAD_LETTERS.labels(self.task, collection.name, reason).inc()
        value = dead_letter(error=error, task=self.task, collection=collection.name, original=original,
                            limit=self.dead_limit, **context)
        return await self.producer.send(collection.dead_topic, value, headers=collection.headers(self.task))

    async def _acked(self, futures: list[asyncio.Future[Any]]) -> None:
        if not futures:
            return
        try:
            await asyncio.gather(*futures)
        except (MessageSizeTooLargeError, RecordTooLargeError) as e:
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers} refused a record as too large although "
                                f"it fits kafka.max_message_bytes={self.max_message_bytes}: set that to the "
                                f"broker's message.max.bytes (or lower): {e!r}") from e
        except KafkaError as e:
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: write not acknowledged: {e!r}") from e

    def _count(self, collection: Collection, result: WriteResult) -> None:
        if result.written:
            metrics.DOCS_OUT.labels(self.task, collection.name).inc(result.written)
            metrics.BYTES_OUT.labels(self.task, collection.name).inc(result.bytes)


AssignFn = Callable[[set[TopicPartition]], Awaitable[dict[TopicPartition, int | None]]]
RevokeFn = Callable[[set[TopicPartition]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):
    def __init__(self, reader: CollectionReader) -> None:
        self.reader = reader

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._held(set())
        if revoked and self.reader.on_revoke:
            try:
                await self.reader.on_revoke(set(revoked))
            except Exception as e:  # noqa: BLE001 - see on_partitions_assigned
                self.reader.failure = e

    def _held(self, partitions: set[TopicPartition]) -> None:
        """For /status: which partitions this worker holds now (the cluster view of `localflow status`)."""
        if self.reader.task:
            from pipeline.runtime.task import STATUS

            status = STATUS.get(self.reader.task)
            if status is not None:
                status.partitions = sorted((tp.topic, tp.partition) for tp in partitions)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._held(assigned)
        self.reader.settling = True
        try:
            await self._assigned(assigned)
        except Exception as e:  # noqa: BLE001 - aiokafka would log and drop it: keep it for batch()
            self.reader.failure = e
        finally:
            self.reader.settling = False

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned or self.reader.on_assign is None:
            return
        consumer = self.reader.consumer
        # Meanwhile the fetcher starts at the group's committed offsets, which a task that stores
        # its own may be behind or ahead of: paused, no such record reaches `batch()` before the seek.
        consumer.pause(*assigned)
        try:
            positions = await self.reader.on_assign(set(assigned))
            stored = {TopicPartition(*tp): o for tp, o in positions.items() if tp in assigned and o is not None}
            try:
                await self.reader.check_range(stored)
            except OffsetGap:
                raise
            except EndpointError as e:  # a slow broker: the fetch and idle checks still find a gap
                log.warning("%s: cannot read the partitions' ranges to check the stored offsets on assignment "
                            "(%s); going on, a gap is still found when fetching", self.reader.task or "reader", e)
            for tp in assigned:
                offset = positions.get(tp)
                if offset is not None:
                    consumer.seek(tp, offset)
                else:
                    await consumer.seek_to_beginning(tp)
        finally:
            consumer.resume(*assigned)


@dataclass
class ReaderOptions:
    max_records: int = 10_000
    fetch_max_bytes: int = 32 * 1024 * 1024
    max_partition_fetch_bytes: int = 8 * 1024 * 1024
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_interval_ms: int = 300_000
    fetch_max_wait_ms: int = 100
    """How long the broker may hold a fetch waiting for data: part of every idle document's latency
    (some brokers, Tansu among them, do not answer a waiting fetch early when data arrives)."""
    extra: dict[str, Any] = field(default_factory=dict)


COMMIT_TIMEOUT_S = 10.0
"""How long a group commit may take before it fails as an EndpointError (a derivation restarts and derives
the batch again; a materialization, whose endpoint holds the checkpoint, skips it)."""


class CollectionReader:
    """Consumer-group batches of records (documents decoded on first use) from one or more collections.

    A task that stores its own offsets (Postgres, Redis, S3) passes ``on_assign``: it is called
    with newly assigned partitions and returns where to start each one (None = the beginning).
    Without it the group's committed offsets apply, and new groups start at the earliest
    offset (never "latest": some brokers answer latest-offset lookups wrongly).

    Gaps: with ``on_assign``, a stored offset outside its partition's range is never "reset"
    to the nearest end (aiokafka's ``auto_offset_reset`` would do it at INFO level, and the
    task would commit past records it never read): ``batch()`` raises ``OffsetGap``. Three
    ways to find one, for three kinds of broker:

    * on assignment, the stored offset is compared with the log start (ListOffsets earliest)
      and the end (the high watermark of a fetch): retention, or a recreated topic;
    * a fetch the broker answers OFFSET_OUT_OF_RANGE (Apache Kafka, Redpanda, once retention
      deletes the segment under a running reader) raises it, since ``auto_offset_reset`` is
      ``"none"``;
    * a broker that answers a fetch beyond the end with nothing (Tansu) leaves the position
      past the high watermark: an idle ``batch()`` checks that and confirms it with a fresh
      fetch before it raises.

    Not detectable from offsets alone: a topic recreated and refilled past the stored offset
    before the reader looks (the stored offset is then in range, of other records); Kafka's
    topic ids would tell, and aiokafka does not expose them.
    """

    def __init__(self, kafka: KafkaConfig, group_id: str | None, collections: Sequence[Collection], *,
                 on_assign: AssignFn | None = None, on_revoke: RevokeFn | None = None,
                 options: ReaderOptions | None = None, task: str = "") -> None:
        self.kafka = kafka
        self.collections = {c.topic: c for c in collections}
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.options = options or ReaderOptions()
        self.task = task
        o = self.options
        self.consumer = AIOKafkaConsumer(
            **kafka.client_options(), group_id=group_id, enable_auto_commit=False,
            auto_offset_reset="none" if on_assign is not None else "earliest", isolation_level="read_uncommitted",
            fetch_max_bytes=o.fetch_max_bytes, max_partition_fetch_bytes=o.max_partition_fetch_bytes,
            session_timeout_ms=o.session_timeout_ms, heartbeat_interval_ms=o.heartbeat_interval_ms,
            max_poll_interval_ms=o.max_poll_interval_ms, fetch_max_wait_ms=o.fetch_max_wait_ms, **o.extra,
        )
        self._group = group_id
        self.settling = False
        """True while an assignment is being set up: until its seeks, positions are the group's
        committed offsets, not where this reader will read."""
        self.failure: Exception | None = None
        """An error raised by ``on_assign``/``on_revoke``; ``batch()`` raises it (the task restarts)."""

    async def start(self, partitions: Sequence[TopicPartition] | None = None) -> None:
        """Join the group (or read ``partitions`` directly, without a group).

        Topics are created first with the catalog's partition count: some brokers auto-create a
        subscribed topic with their own default count.
        """
        if partitions is None and self.collections:
            topics = {c.topic: (c.partitions, c.replication_factor, c.topic_configs) for c in self.collections.values()}
            await Admin(self.kafka).ensure(topics)
        try:
            await self.consumer.start()
        except KafkaError as e:
            await self.consumer.stop()  # a consumer that failed to start still holds its client
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: cannot start consumer: {e!r}") from e
        if partitions is not None:
            self.consumer.assign(list(partitions))
        else:
            self.consumer.subscribe(topics=list(self.collections), listener=_Listener(self))

    async def stop(self) -> None:
        await self.consumer.stop()

    async def __aenter__(self) -> CollectionReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def batch(self, timeout_ms: int = 500, max_records: int | None = None) -> list[Record]:
        """The next batch (possibly empty after ``timeout_ms``), in offset order per partition."""
        self.raise_failure()
        try:
            fetched = await self.consumer.getmany(timeout_ms=timeout_ms,
                                                  max_records=max_records or self.options.max_records)
        except NoOffsetForPartitionError:
            # The group had no committed offset when the partition was assigned, before the listener
            # seeked it to the task's own (every partition is seeked): a stale report, not a gap.
            return []
        except OffsetOutOfRangeError as e:
            await self.check_range(dict(e.args[0]) if e.args and isinstance(e.args[0], dict) else {}, confirmed=True)
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: offset out of range: {e!r}") from e
        except KafkaError as e:
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: fetch failed: {e!r}") from e
        if not fetched and self.on_assign is not None:
            await self._beyond_end()
        out: list[Record] = []
        if self._group and fetched:
            # Records fetched just before a rebalance took their partition belong to its new owner.
            owned = self.consumer.assignment()
            fetched = {tp: ms for tp, ms in fetched.items() if tp in owned}
        for tp, messages in fetched.items():  # documents are decoded when first used (Record.doc)
            topic, partition = tp.topic, tp.partition
            out += [Record(topic, partition, m.offset, m.timestamp, m.key, m.value, headers=m.headers)
                    for m in messages]
        if out and self.task:
            for tp, messages in fetched.items():
                c = self.collections.get(tp.topic)
                metrics.DOCS_IN.labels(self.task, c.name if c else tp.topic).inc(len(messages))
        return out

    def raise_failure(self) -> None:
        """Raise what ``on_assign``/``on_revoke`` raised in the last rebalance, once: until then the
        partitions it concerns were never seeked, and their positions mean nothing."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    async def check_range(self, stored: dict[TopicPartition, int], *, confirmed: bool = False) -> None:
        """Raise OffsetGap for the first stored offset outside its partition's [log start, end].

        The end comes from a fresh fetch (ListOffsets latest is wrong on some brokers). With
        ``confirmed`` (the broker said out of range), a gap is raised even when the range
        cannot be read.
        """
        if not stored:
            return
        from pipeline.runtime.offsets import beginning_offsets, high_watermarks, probe_consumer

        tps = sorted(stored)
        try:
            async with probe_consumer(self.kafka) as probe:
                begin = await beginning_offsets(probe, tps)
                end = await high_watermarks(probe, tps)
        except EndpointError:
            if not confirmed:
                raise
            begin, end = {}, {}
        for tp in tps:
            b, e, offset = begin.get(tp), end.get(tp), stored[tp]
            inside = (b is None or offset >= b) and (e is None or offset <= e)
            if not inside or (confirmed and (b is None or e is None)):
                raise OffsetGap(self.task or "reader", tp.topic, tp.partition, offset, b, e)

    async def _beyond_end(self) -> None:
        """An idle reader whose position is past a partition's high watermark is in a gap (Tansu
        answers such a fetch with nothing, where Kafka answers OFFSET_OUT_OF_RANGE)."""
        past = {}
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is not None and not self.consumer.paused() & {tp}:
                position = await self.consumer.position(tp)
                if position > hw:
                    past[tp] = position
        if past:
            await self.check_range(past)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit next offsets of the partitions this reader still owns, and report their lag.

        Advisory for tasks that store their own checkpoints; the checkpoint of those that don't.
        """
        offsets = {TopicPartition(*tp): o for tp, o in offsets.items()}  # a connector's: plain tuples
        if self.task:
            for tp, offset in offsets.items():
                hw = self.highwater(tp)
                if hw is not None:
                    metrics.CONSUMER_LAG.labels(self.task, tp.topic, str(tp.partition)).set(max(0, hw - offset))
        owned = self.consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if offsets and self._group:
            try:  # bounded: aiokafka retries a commit forever while a partition's topic is gone
                await asyncio.wait_for(self.consumer.commit(offsets), COMMIT_TIMEOUT_S)
            except KafkaError as e:
                raise EndpointError(f"Kafka: commit of {len(offsets)} partitions failed: {e!r}") from e
            except TimeoutError:
                raise EndpointError(f"Kafka: commit of {len(offsets)} partitions got no answer within "
                                    f"{COMMIT_TIMEOUT_S:g}s (was a topic deleted?)") from None

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def pause(self, partitions: set[TopicPartition]) -> None:
        """Fetch nothing more of these partitions (those still assigned) until ``resume``."""
        owned = self.consumer.assignment()
        self.consumer.pause(*(tp for tp in map(TopicPartition._make, partitions) if tp in owned))

    def resume(self, partitions: set[TopicPartition]) -> None:
        owned = self.consumer.assignment()
        self.consumer.resume(*(tp for tp in map(TopicPartition._make, partitions) if tp in owned))

    def highwater(self, tp: TopicPartition) -> int | None:
        """The fetch high watermark (right on every broker, unlike ListOffsets latest)."""
        return self.consumer.highwater(TopicPartition(*tp))

    async def position(self, tp: TopicPartition) -> int:
        return await self.consumer.position(TopicPartition(*tp))


async def read_to_end(kafka: KafkaConfig, topic: str, *, timeout: float = 10.0,
                      from_offsets: dict[int, int] | None = None) -> list[Record]:
    """Every record of a topic up to its current high watermark, without a consumer group.

    Used for checkpoints, dead letters and tests. The end is the fetch high watermark, which every
    broker reports correctly. `timeout` bounds a *stall*, not the whole read: each batch that
    arrives extends the deadline, so a large topic on a loaded machine takes longer but never
    fails for being large, while a read that stops making progress still fails after `timeout`.
    """
    reader = CollectionReader(kafka, None, [])
    await reader.consumer.start()
    try:
        parts = reader.consumer.partitions_for_topic(topic)
        if parts is None:
            await reader.consumer._client.force_metadata_update()  # noqa: SLF001 - first sight of the topic
            parts = reader.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        reader.consumer.assign(tps)
        for tp in tps:
            start = (from_offsets or {}).get(tp.partition)
            if start is None:
                await reader.consumer.seek_to_beginning(tp)
            else:
                reader.consumer.seek(tp, start)
        out: list[Record] = []
        done: set[TopicPartition] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(tps):
            if time.monotonic() > deadline:
                raise EndpointError(f"Kafka: reading {topic} to its end made no progress for {timeout:.0f}s "
                                    f"({len(out)} records read, {len(done)} of {len(tps)} partitions at their end)")
            batch = await reader.batch(timeout_ms=200)
            if batch:
                out.extend(batch)
                deadline = time.monotonic() + timeout
            for tp in tps:
                hw = reader.highwater(tp)
                if hw is not None and await reader.position(tp) >= hw:
                    done.add(tp)
        return out
    finally:
        await reader.consumer.stop()
