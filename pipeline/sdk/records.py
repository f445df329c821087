"""What a materialization reads: ``Record`` (one decoded message of a collection) and partitions.

``TopicPartition`` is a plain named tuple: it equals and hashes like aiokafka's, so the runtime's
and a connector's partitions are the same dict keys, and no connector imports a Kafka client.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

SOURCE_HEADER = "localflow-source"
"""Header of a derived document: ``<topic>:<partition>:<offset>`` of the input it came from."""


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(slots=True)
class Record:
    """One message read from a collection, decoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    doc: Any = None
    error: str | None = None  # set when the value is not JSON (written by someone else)
    headers: Sequence[tuple[str, bytes]] = ()

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def source(self) -> tuple[str, int]:
        """``("<topic>:<partition>", offset)``: the clock of the document's key. A derived document's
        SOURCE_HEADER, else (a capture's document, or a header someone else mangled) this record's
        own position. A key's versions are ordered by offset within one clock; two clocks do not
        compare (the later write wins)."""
        for name, value in self.headers:
            if name == SOURCE_HEADER:
                clock, _, offset = value.decode(errors="replace").rpartition(":")
                if clock and offset.isascii() and offset.isdigit():
                    return clock, int(offset)
        return f"{self.topic}:{self.partition}", self.offset


def next_offsets(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """Per partition, the offset after the last of ``records`` (what to commit once they are done)."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        out[r.tp] = r.offset + 1
    return out
