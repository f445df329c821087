"""Read an archive back, check every object against its metadata, de-duplicated by Kafka offset.

Why de-duplicate: a replaced worker can, in one narrow window S3 cannot close (see
``archive``), upload an object whose offset range overlaps the new owner's objects with other
boundaries. Each line's offset is known exactly (the object's first..last offsets, minus the
ranges listed in its ``gaps`` metadata), so a reader keeps the first copy of every offset and
counts the rest as duplicates. Objects are read per partition in order of first offset.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import zstandard

from connectors.s3.archive import Archive
from connectors.s3.client import client
from connectors.s3.config import S3Config, S3Resource
from connectors.s3.naming import Layout, ObjectName


@dataclass
class ArchiveReport:
    """What ``verify`` found under one binding's data prefix."""

    objects: int = 0
    documents: int = 0
    """Distinct offsets that hold a document."""
    duplicates: int = 0
    """Lines whose offset an earlier object already held (overlapping objects)."""
    overlaps: list[tuple[str, str]] = field(default_factory=list)
    """Pairs of object keys whose offset ranges overlap."""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(key, what is wrong): unreadable body, count or SHA-256 not matching the metadata, bad JSON."""
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Per partition, the lowest and highest archived offset."""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.duplicates


Sink = Callable[[int, int, bytes], Any]
"""Called with (partition, offset, JSON line) for each distinct document, in offset order."""


async def verify(archive: Archive, layout: Layout, on_document: Sink | None = None) -> ArchiveReport:
    """Read every object of ``layout`` (this version only) and report; ``on_document`` sees each once."""
    names: dict[int, list[ObjectName]] = {}
    async for key in archive.keys(layout.data):
        name = layout.parse(key)
        if name is not None:
            names.setdefault(name.partition, []).append(name)
    report = ArchiveReport()
    for partition in sorted(names):
        objects = sorted(names[partition], key=lambda n: (n.first, n.last))
        high = -1
        previous: ObjectName | None = None
        for name in objects:
            report.objects += 1
            if previous is not None and name.first <= previous.last:
                report.overlaps.append((previous.key, name.key))
            lines = await _read(archive, name, report)
            for offset, line in lines:
                if offset <= high:
                    report.duplicates += 1
                    continue
                high = offset
                report.documents += 1
                if on_document is not None:
                    on_document(partition, offset, line)
            if previous is None or name.last > previous.last:
                previous = name
        report.ranges[partition] = (objects[0].first, max(n.last for n in objects))
    return report


async def verify_binding(config: S3Config, collection: str, resource: S3Resource,
                         on_document: Sink | None = None) -> ArchiveReport:
    """``verify`` for one binding of a catalog (e.g. for `localflow verify`)."""
    async with client(config) as s3:
        archive = Archive(s3, config.bucket, config.advanced)
        return await verify(archive, Layout.of_binding(config, collection, resource), on_document)


async def _read(archive: Archive, name: ObjectName, report: ArchiveReport) -> list[tuple[int, bytes]]:
    """The object's lines paired with their offsets; problems go to the report."""
    got = await archive.s3.get_object(Bucket=archive.bucket, Key=name.key)
    async with got["Body"] as body:
        data = await body.read()
    meta = got.get("Metadata", {})
    try:
        raw = decompress(data, got.get("ContentEncoding"))
    except (OSError, EOFError, zstandard.ZstdError) as e:
        report.problems.append((name.key, f"body does not decompress: {e}"))
        return []
    lines = raw.split(b"\n")[:-1] if raw else []
    if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
        report.problems.append((name.key, "SHA-256 of the JSON lines does not match its metadata"))
    if str(len(lines)) != meta.get("documents"):
        report.problems.append((name.key, f"{len(lines)} lines, metadata says {meta.get('documents')}"))
    offsets = line_offsets(name, meta.get("gaps", ""))
    if len(offsets) != len(lines):
        report.problems.append((name.key, f"{len(lines)} lines for {len(offsets)} offsets"))
        return []
    for line in lines:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as e:
            report.problems.append((name.key, f"a line is not JSON: {e}"))
            break
    return list(zip(offsets, lines, strict=True))


def line_offsets(name: ObjectName, gaps: str) -> list[int]:
    """The offset of each line: first..last minus the ``gaps`` ranges ("lo-hi,lo-hi")."""
    skipped: set[int] = set()
    for part in filter(None, gaps.split(",")):
        lo, _, hi = part.partition("-")
        skipped.update(range(int(lo), int(hi) + 1))
    return [o for o in range(name.first, name.last + 1) if o not in skipped]


def decompress(data: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data
