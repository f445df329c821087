"""The Materialization contract: what an endpoint connector implements, and the ``Batch`` it gets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pipeline.sdk.context import Context
from pipeline.sdk.records import Record, TopicPartition, next_offsets

Offsets = dict[TopicPartition, int]


@dataclass
class Batch:
    """Records of one poll, in offset order per partition, with the binding of each topic."""

    records: list[Record]
    bindings: dict[str, int]
    """Topic -> index of the binding in the materialization spec."""

    def next_offsets(self) -> Offsets:
        """Per partition, the offset after the last record of this batch."""
        return next_offsets(self.records)


class Materialization(ABC):
    """An endpoint kept in step with collections. Build no state in ``__init__``.

    MUST: make a batch's writes and its next offsets durable together, or neither;
    on ``assigned``, fence the partitions (a previous owner's later writes must fail) and
    return the stored next offset of each (None: from the beginning); raise ``Fenced`` from
    ``apply`` when a partition was taken over, writing nothing of that batch for it.
    MUST NOT: let a replayed (older) document overwrite a newer one where the endpoint has
    state per key.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.spec: Any = ctx.spec
        self.config: Any = ctx.spec.config

    async def open(self) -> None:
        """Connect and create what the bindings need (tables, buckets); idempotent."""

    @abstractmethod
    async def assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Fence newly assigned partitions and say where each resumes."""

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions leave this worker: flush or drop what is buffered for them."""

    @abstractmethod
    async def apply(self, batch: Batch) -> Offsets:
        """Write the batch; return next offsets now durable at the endpoint (may be {})."""

    async def rewind(self, offsets: Offsets) -> Offsets:
        """Set held partitions' stored next offsets back to ``offsets``; return those now durable.

        Only `localflow replay` calls it, for a partition whose stored offset is beyond its end (the
        topic was recreated) when the replay had nothing of it to apply: without it the endpoint
        would keep the offset past the gap and its workers would stop on it again. MUST respect
        the fence like ``apply``. The default says the connector cannot.
        """
        raise NotImplementedError

    async def tick(self) -> Offsets:
        """Called when a poll brings nothing: time-based flushes of buffering endpoints."""
        return {}

    async def close(self, failed: bool) -> Offsets:
        """Flush (unless ``failed``) and disconnect; return offsets made durable by the flush."""
        return {}
