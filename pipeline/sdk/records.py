"""What a materialization reads: ``Record`` (one message of a collection, decoded on use) and partitions.

``TopicPartition`` is a plain named tuple: it equals and hashes like aiokafka's, so the runtime's
and a connector's partitions are the same dict keys, and no connector imports a Kafka client.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

SOURCE_HEADER = "localflow-source"
"""Header of a derived document: ``<topic>:<partition>:<offset>`` of the input it came from."""
SCHEMA_HEADER = "localflow-schema"
"""Header of every record localflow's writer wrote: the fingerprint of the schema it validated against."""


class TopicPartition(NamedTuple):
    topic: str
    partition: int


_UNDECODED: Any = object()
"""``Record._doc`` before the value was decoded."""


class Record:
    """One message read from a collection; its document is decoded on first use.

    Decoding every value was about 40% of reading: the S3 archive never needs the document and
    Postgres loads the original bytes, so ``doc`` and ``error`` decode when first asked for. A
    value written by localflow's writer (it carries SCHEMA_HEADER) was serialized by it from a
    validated document, so it is JSON: ``error`` is None without decoding it.
    """

    __slots__ = ("topic", "partition", "offset", "timestamp_ms", "key", "value", "_doc", "_error", "headers")

    def __init__(self, topic: str, partition: int, offset: int, timestamp_ms: int, key: bytes | None,
                 value: bytes, doc: Any = _UNDECODED, error: str | None = None,
                 headers: Sequence[tuple[str, bytes]] = ()) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.key = key
        self.value = value
        self._doc = doc
        self._error = error
        self.headers = headers

    @property
    def doc(self) -> Any:
        """The decoded document (None when the value is not JSON: ``error`` says why)."""
        if self._doc is _UNDECODED:
            self._decode()
        return self._doc

    @doc.setter
    def doc(self, value: Any) -> None:
        self._doc = value

    @property
    def error(self) -> str | None:
        """Why the value is not a JSON document (None when it is)."""
        if self._doc is _UNDECODED and self._error is None and not self.from_writer:
            self._decode()
        return self._error

    @error.setter
    def error(self, value: str | None) -> None:
        self._error = value

    @property
    def from_writer(self) -> bool:
        """Written by localflow's writer (it validated the document, and its value is JSON)."""
        for name, _ in self.headers:
            if name == SCHEMA_HEADER:
                return True
        return False

    def _decode(self) -> None:
        try:
            self._doc = orjson.loads(self.value)
        except (orjson.JSONDecodeError, TypeError) as e:  # TypeError: a null value (a tombstone)
            self._doc = None
            self._error = f"value is not JSON: {e}"

    def __repr__(self) -> str:
        return (f"Record({self.topic!r}, {self.partition}, {self.offset}, {self.timestamp_ms}, key={self.key!r}, "
                f"value={reprlib.repr(self.value)})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (self.topic, self.partition, self.offset, self.key, self.value, self.headers) == (
            other.topic, other.partition, other.offset, other.key, other.value, other.headers)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

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
    last = {(r.topic, r.partition): r.offset for r in records}  # a plain tuple per record: half the time of .tp
    return {TopicPartition(*tp): offset + 1 for tp, offset in last.items()}
