"""Capture checkpoints, stored in Kafka so a capture container needs no volume.

Materializations keep their checkpoints in their own endpoint, in the same transaction as the
data (Postgres table, Redis MULTI/EXEC, S3 object names); captures keep theirs here, in a
compacted topic keyed by task. A checkpoint is written only after the documents it covers
were acknowledged by the broker.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from pipeline.catalog import KafkaConfig
from pipeline.collection import Admin, CollectionWriter, read_to_end
from pipeline.errors import CheckpointError

CHECKPOINT_TOPIC = "localflow.checkpoints"


class CaptureCheckpoint(BaseModel):
    """The stored envelope; ``state`` is the capture's own (e.g. file offsets, an API cursor)."""

    version: Literal[1] = 1
    task: str
    state: dict[str, Any]
    written_at: str


class KafkaCheckpoints:
    """Load and save capture checkpoints in the compacted ``localflow.checkpoints`` topic."""

    def __init__(self, kafka: KafkaConfig, topic: str = CHECKPOINT_TOPIC) -> None:
        self.kafka = kafka
        self.topic = topic

    async def ensure(self) -> None:
        await Admin(self.kafka).ensure(
            {self.topic: (1, 1, {"cleanup.policy": "compact"})}
        )

    async def load(self, task: str) -> dict[str, Any] | None:
        """The latest state saved by ``task``; None when it never saved one.

        Raises CheckpointError when the latest one is unreadable: a broken checkpoint is
        reported, never silently reset (that would re-capture or skip data).
        """
        await self.ensure()
        key = task.encode()
        latest = None
        for rec in await read_to_end(self.kafka, self.topic, timeout=30):
            if rec.key == key:
                latest = rec
        if latest is None or latest.value is None:
            return None
        try:
            return CaptureCheckpoint.model_validate_json(latest.value).state
        except ValidationError as e:
            raise CheckpointError(
                f"checkpoint of task {task!r} at {self.topic}[{latest.partition}]@{latest.offset} is unreadable: "
                f"{e.errors(include_url=False)[0]['msg']}; fix or delete it deliberately "
                f"(localflow will not reset it silently)") from None

    async def save(self, writer: CollectionWriter, task: str, state: dict[str, Any]) -> None:
        """Write ``state`` for ``task`` and wait for the broker's acknowledgement."""
        envelope = {"version": 1, "task": task, "state": state,
                    "written_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        fut = await writer.producer.send(self.topic, orjson.dumps(envelope), key=task.encode())
        await fut
