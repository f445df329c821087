"""The Materialization contract: what an endpoint connector implements, and the ``Batch`` it gets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from pipeline.sdk.context import ConnectorBase
from pipeline.sdk.records import Record, TopicPartition, next_offsets

Offsets = dict[TopicPartition, int]


@dataclass
class Applied:
    """What ``apply``, ``tick`` or ``close`` made durable: the runtime counts it, emits the metrics and
    commits the offsets (a connector touches no metric)."""

    offsets: Offsets = field(default_factory=dict)
    """Per partition, the next offset now durable at the endpoint (partitions without news: absent)."""
    documents: dict[int, int] = field(default_factory=dict)
    """Documents written, per binding index (``localflow_output_documents``)."""
    dead: int = 0
    """Documents of the batch sent to a dead-letter topic instead (``ctx.dead_letter``)."""
    stored_bytes: dict[int, int] = field(default_factory=dict)
    """Bytes of objects the endpoint now stores, per binding (an archive; ``localflow_archive_bytes``)."""

    def __bool__(self) -> bool:
        """Whether anything happened."""
        return bool(self.offsets or self.documents or self.dead or self.stored_bytes)

    def then(self, later: Applied) -> Applied:
        """This report and a later one as one (offsets: the later wins; counts add up)."""
        if not self:
            return later

        def added(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}

        return Applied({**self.offsets, **later.offsets}, documents=added(self.documents, later.documents),
                       dead=self.dead + later.dead, stored_bytes=added(self.stored_bytes, later.stored_bytes))


@dataclass
class Batch:
    """Records of one poll, in offset order per partition, with the binding of each topic."""

    records: list[Record]
    bindings: dict[str, int]
    """Topic -> index of the binding in the materialization spec."""
    reapply: frozenset[TopicPartition] = frozenset()
    """Partitions `localflow replay` re-reads on purpose: apply their records even below the stored
    offset (elsewhere such records are a retry of what is already durable, and are skipped)."""

    def next_offsets(self) -> Offsets:
        """Per partition, the offset after the last record of this batch."""
        return next_offsets(self.records)


class Materialization(ConnectorBase, ABC):
    """An endpoint kept in step with collections. Build no state in ``__init__``.

    MUST: make a batch's writes and its next offsets durable together, or neither;
    on ``assigned``, fence the partitions (a previous owner's later writes must fail) and
    return the stored next offset of each (None: from the beginning); raise ``Fenced`` from
    ``apply`` when a partition was taken over, writing nothing of that batch for it.
    MUST NOT: let a replayed (older) document overwrite a newer one where the endpoint has
    state per key, touch a metric or the task's status (return ``Applied``; ``ctx.report`` an
    error it handles). The runtime checks that durable offsets never go back from where a
    partition resumed or was last made durable, nor beyond the records given (else an
    ImplementationError stops the task).
    """

    async def open(self) -> None:
        """Connect and create what the bindings need (tables, buckets); idempotent."""

    @abstractmethod
    async def assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Fence newly assigned partitions and say where each resumes."""

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions leave this worker: flush or drop what is buffered for them."""

    @abstractmethod
    async def apply(self, batch: Batch) -> Applied:
        """Write the batch; return what is now durable at the endpoint (its offsets may be {}).

        Raise ``Backpressure`` to have the same batch applied again later (its partitions paused)."""

    async def rewind(self, offsets: Offsets) -> Offsets:
        """Set held partitions' stored next offsets back to ``offsets``; return those now durable.

        Only `localflow replay` calls it, for a partition whose stored offset is beyond its end (the
        topic was recreated) when the replay had nothing of it to apply: without it the endpoint
        would keep the offset past the gap and its workers would stop on it again. MUST respect
        the fence like ``apply``. The default says the connector cannot.
        """
        raise NotImplementedError

    async def tick(self) -> Applied:
        """Called when a poll brings nothing: time-based flushes of buffering endpoints."""
        return Applied()

    async def close(self, failed: bool) -> Applied:
        """Flush (unless ``failed``) and disconnect; return what the flush made durable."""
        return Applied()
