"""Object names of the archive: derived only from what an object holds, so a retry rewrites itself.

Data objects::

    <prefix><collection>/[v<NNNN>/]dt=YYYY-MM-DD/hr=HH/p=<partition>/<first offset>-<last offset>.jsonl[.gz|.zst]

Offsets are zero-padded to 20 digits so keys sort by offset within an hour. The hour comes from
the Kafka timestamp of the object's first record (never the wall clock), clamped so that it is
never earlier than the hour of the partition's previous object: hours are monotonic per
partition, which is what lets a resume look only at the hours after a known object.

Per-partition markers live outside the data prefix (so lifecycle rules and query engines that
read ``<prefix><collection>/`` never see them)::

    <prefix>_localflow/<collection>/[v<NNNN>/]p=<partition>.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from connectors.s3.config import S3Config, S3Resource

OFFSET_DIGITS = 20
EXTENSIONS = {"gzip": ".jsonl.gz", "zstd": ".jsonl.zst", "none": ".jsonl"}
CONTENT_ENCODINGS = {"gzip": "gzip", "zstd": "zstd", "none": None}
CONTENT_TYPE = "application/x-ndjson"

_TAIL = re.compile(r"^(dt=\d{4}-\d{2}-\d{2}/hr=\d{2})/p=(\d+)/(\d{20})-(\d{20})\.jsonl(?:\.gz|\.zst)?$")


def hour_of(timestamp_ms: int) -> str:
    """``dt=YYYY-MM-DD/hr=HH`` (UTC) of a Kafka timestamp; these strings sort in time order."""
    return datetime.fromtimestamp(max(timestamp_ms, 0) / 1000, UTC).strftime("dt=%Y-%m-%d/hr=%H")


@dataclass(frozen=True, slots=True)
class ObjectName:
    """What a data object's key says about it."""

    key: str
    hour: str
    partition: int
    first: int
    last: int


@dataclass(frozen=True)
class Layout:
    """Where one binding's objects and markers live."""

    root: str
    """``<prefix><collection>/``: every version of the binding (its lifecycle rule's prefix)."""
    data: str
    """``<prefix><collection>/[v<NNNN>/]``: every data object of the binding starts with it."""
    state: str
    """``<prefix>_localflow/<collection>/[v<NNNN>/]``: the binding's partition markers."""
    extension: str

    @classmethod
    def of(cls, prefix: str, collection: str, compression: str, backfill: int = 0) -> Layout:
        version = f"v{backfill:04d}/" if backfill else ""
        root = f"{prefix}{collection}/"
        return cls(root, f"{root}{version}", f"{prefix}_localflow/{collection}/{version}",
                   EXTENSIONS[compression])

    @classmethod
    def of_binding(cls, config: S3Config, collection: str, resource: S3Resource) -> Layout:
        prefix = config.prefix if resource.prefix is None else resource.prefix
        return cls.of(prefix, collection, resource.compression, resource.backfill)

    def object_key(self, hour: str, partition: int, first: int, last: int) -> str:
        return (f"{self.data}{hour}/p={partition}/"
                f"{first:0{OFFSET_DIGITS}d}-{last:0{OFFSET_DIGITS}d}{self.extension}")

    def partition_prefix(self, hour: str, partition: int) -> str:
        return f"{self.data}{hour}/p={partition}/"

    def marker_key(self, partition: int) -> str:
        return f"{self.state}p={partition}.json"

    def parse(self, key: str) -> ObjectName | None:
        """The parts of a data object's key of this layout (any compression), or None."""
        if not key.startswith(self.data):
            return None
        m = _TAIL.match(key[len(self.data):])
        if m is None:
            return None
        return ObjectName(key, m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
