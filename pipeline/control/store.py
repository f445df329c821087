"""The config topic: the API's changes to the catalog, shared by every worker of a deployment.

One partition, ``cleanup.policy=compact``: each record's key is ``[section, name]`` (orjson),
its value the entry (orjson) or a tombstone (null) that deletes it. Sections are the catalog's
``collections``, ``captures`` and ``materializations``, plus ``paused`` (a task's target state)
and ``restart`` (a request, applied only by workers that see it after they caught up).

Every worker tails the topic from its beginning, so the latest value per key is the state,
whether or not the broker compacts (Tansu keeps everything; Kafka compacts). A write returns
once this worker's own reader has applied it: a caller reads its own writes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.runtime.catalog import KafkaConfig
from pipeline.runtime.collection import Admin
from pipeline.sdk.errors import EndpointError

DEFAULT_TOPIC = "localflow.config"
SECTIONS = ("collections", "captures", "materializations", "paused", "restart")

log = logging.getLogger("localflow.control")

Key = tuple[str, str]


class ConfigStore:
    """The entries of the config topic, kept up to date by a background reader."""

    def __init__(self, kafka: KafkaConfig, topic: str = DEFAULT_TOPIC) -> None:
        self.kafka, self.topic = kafka, topic
        self.entries: dict[Key, Any] = {}
        self.caught_up = asyncio.Event()
        self.on_change: Callable[[Key, Any, bool], None] | None = None
        """Called for each record applied: key, value (None: deleted), and whether it came after catch-up."""
        self._tp = TopicPartition(topic, 0)
        self._next = 0  # offset of the next record to apply
        self._applied = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None

    def section(self, name: str) -> dict[str, Any]:
        """The live entries of one section, by name."""
        return {n: v for (s, n), v in self.entries.items() if s == name}

    def overlay(self) -> dict[str, dict[str, Any]]:
        """The catalog sections the API added (collections, captures, materializations)."""
        return {s: self.section(s) for s in SECTIONS[:3]}

    async def start(self) -> None:
        """Start reading in the background (retried while Kafka is unreachable)."""
        self._reader = asyncio.create_task(self._read_forever(), name="localflow-config-reader")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def load(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Read the topic to its end once (for `localflow export`); raises EndpointError."""
        await self.start()
        try:
            if not await self.wait_caught_up(timeout):
                raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: the config topic {self.topic} "
                                    f"was not read within {timeout:g}s")
        finally:
            await self.stop()

    async def wait_caught_up(self, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout)
            return True
        except TimeoutError:
            if self._reader is not None and self._reader.done() and self._reader.exception():
                raise self._reader.exception() from None  # type: ignore[misc]
            return False

    async def put(self, section: str, name: str, value: Any, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Write an entry (None deletes it); returns once this worker applied it."""
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r}")
        if self._producer is None:
            producer = AIOKafkaProducer(**self.kafka.client_options(), acks="all", enable_idempotence=False)
            try:
                await producer.start()
            except KafkaError as e:
                await producer.stop()
                raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: cannot write the config topic "
                                    f"{self.topic}: {e!r}") from e
            self._producer = producer
        key = orjson.dumps([section, name])
        body = None if value is None else orjson.dumps(value)
        try:
            meta = await self._producer.send_and_wait(self.topic, body, key=key, partition=0)
        except KafkaError as e:
            raise EndpointError(f"Kafka: writing {section}/{name} to {self.topic} failed: {e!r}") from e
        async with self._applied:
            try:
                await asyncio.wait_for(self._applied.wait_for(lambda: self._next > meta.offset), timeout)
            except TimeoutError:
                raise EndpointError(f"the config topic {self.topic} was written (offset {meta.offset}) but this "
                                    f"worker did not read it back within {timeout:g}s") from None

    async def _read_forever(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._read()
            except asyncio.CancelledError:
                raise
            except (KafkaError, EndpointError, OSError) as e:
                log.warning("config topic %s: %s; retrying in %.1fs", self.topic, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _read(self) -> None:
        await Admin(self.kafka).ensure({self.topic: (1, 1, {"cleanup.policy": "compact"})})
        consumer = AIOKafkaConsumer(**self.kafka.client_options(), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=100)  # idle: ~0.3% of a core (measured)
        await consumer.start()
        try:
            consumer.assign([self._tp])
            consumer.seek(self._tp, self._next)
            while True:
                # short waits until caught up: getmany waits its whole timeout when there is nothing
                batch = await consumer.getmany(self._tp, timeout_ms=500 if self.caught_up.is_set() else 20)
                records = batch.get(self._tp, [])
                live = self.caught_up.is_set()
                for record in records:
                    self._apply(record.key, record.value, live)
                    self._next = record.offset + 1
                if records:
                    async with self._applied:
                        self._applied.notify_all()
                highwater = consumer.highwater(self._tp)
                if not self.caught_up.is_set() and highwater is not None and self._next >= highwater:
                    self.caught_up.set()
                    log.info("config topic %s read: %d entr%s", self.topic, len(self.entries),
                             "y" if len(self.entries) == 1 else "ies")
        finally:
            await consumer.stop()

    def _apply(self, raw_key: bytes | None, raw_value: bytes | None, live: bool) -> None:
        try:
            section, name = orjson.loads(raw_key or b"null")
        except (orjson.JSONDecodeError, TypeError, ValueError):
            log.warning("config topic %s: ignoring a record whose key is not [section, name]", self.topic)
            return
        key = (section, name)
        value = None if raw_value is None else orjson.loads(raw_value)
        if value is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = value
        if self.on_change is not None:
            self.on_change(key, value, live)
