"""Capture checkpoints, stored in Kafka so a capture container needs no volume.

Materializations keep their checkpoints in their own endpoint, in the same transaction as the
data (Postgres table, Redis script, S3 object names); captures keep theirs here: one small
compacted topic per capture task (``localflow.checkpoints.<task>``), keyed by the task. The
latest checkpoint is the topic's last record, so loading reads one record whatever the
history (brokers that never compact, such as Tansu, keep every old checkpoint; nothing reads
them). A checkpoint is written only after the documents it covers were acknowledged.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from pipeline.catalog import KafkaConfig, topic_of
from pipeline.collection import Admin, CollectionWriter, Record
from pipeline.errors import CheckpointError, EndpointError
from pipeline.offsets import beginning_offsets, high_watermarks, partitions_of, probe_consumer

CHECKPOINT_PREFIX = "localflow.checkpoints."
_TAIL = 8  # records read back from the end: a compacted tail may hold gaps


class CaptureCheckpoint(BaseModel):
    """The stored envelope; ``state`` is the capture's own (e.g. file offsets, an API cursor)."""

    version: Literal[1] = 1
    task: str
    state: dict[str, Any]
    written_at: str

    @property
    def written_at_epoch(self) -> float:
        return datetime.fromisoformat(self.written_at.replace("Z", "+00:00")).timestamp()


class KafkaCheckpoints:
    """Load and save capture checkpoints, one compacted topic per capture task."""

    def __init__(self, kafka: KafkaConfig, prefix: str = CHECKPOINT_PREFIX, *, replication_factor: int = 1) -> None:
        self.kafka = kafka
        self.prefix = prefix
        self.replication_factor = replication_factor
        """Of the checkpoint topics this store creates: the capture's collections' (a checkpoint on one
        broker would be lost with it, while the documents it covers survive on the others)."""
        self._admin = Admin(kafka)

    def topic(self, task: str) -> str:
        """``localflow.checkpoints.sophia.agent_logs`` for task ``sophia/agent_logs``."""
        return self.prefix + topic_of(task)

    async def ensure(self, task: str) -> None:
        await self._admin.ensure({self.topic(task): (1, self.replication_factor, {"cleanup.policy": "compact"})})

    async def latest(self, task: str) -> CaptureCheckpoint | None:
        """The last checkpoint ``task`` saved; None when it never saved one.

        Raises CheckpointError when it is unreadable: a broken checkpoint is reported, never
        silently reset (that would re-capture or skip data).
        """
        record = await self._last_record(self.topic(task))
        if record is None or not record.value:
            return None
        try:
            return CaptureCheckpoint.model_validate_json(record.value)
        except ValidationError as e:
            raise CheckpointError(
                f"checkpoint of task {task!r} at {record.topic}[{record.partition}]@{record.offset} is unreadable: "
                f"{e.errors(include_url=False)[0]['msg']}; fix or delete it deliberately "
                f"(localflow will not reset it silently)") from None

    async def load(self, task: str) -> dict[str, Any] | None:
        """The state of the latest checkpoint (see ``latest``)."""
        await self.ensure(task)
        checkpoint = await self.latest(task)
        return None if checkpoint is None else checkpoint.state

    async def save(self, writer: CollectionWriter, task: str, state: dict[str, Any]) -> None:
        """Write ``state`` for ``task`` and wait for the broker's acknowledgement."""
        envelope = {"version": 1, "task": task, "state": state,
                    "written_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        topic = self.topic(task)
        try:
            await (await writer.producer.send(topic, orjson.dumps(envelope), key=task.encode()))
        except KafkaError as e:
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: checkpoint of task {task!r} "
                                f"not acknowledged by {topic}: {e!r}") from e

    async def _last_record(self, topic: str) -> Record | None:
        async with probe_consumer(self.kafka, partition_fetch_bytes=16 * 1024 * 1024) as consumer:
            tps = await partitions_of(consumer, topic)
            if not tps:
                return None
            tp = tps[0]
            end = (await high_watermarks(consumer, [tp]))[tp]
            begin = (await beginning_offsets(consumer, [tp]))[tp]
            if end <= begin:
                return None
            consumer.seek(tp, max(begin, end - _TAIL))
            last = None
            try:
                while await consumer.position(tp) < end:
                    for m in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                        if m.offset < end:
                            last = Record(tp.topic, tp.partition, m.offset, m.timestamp, m.key, m.value)
            except KafkaError as e:
                raise EndpointError(f"Kafka: cannot read checkpoint topic {topic}: {e!r}") from e
            return last
