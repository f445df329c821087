"""The S3 archive: each partition's documents batched into JSON-lines objects (see ``archive``).

Per partition, one open batch collects documents in offset order until it reaches the
binding's ``max_documents`` or ``max_bytes``, or its first document has waited ``max_age``;
then it is sealed: its object key (hour, partition, first and last offset) is fixed, so every
retry of that batch writes the same key with the same bytes (gzip without a timestamp).

Uploads (``advanced.overlap``, the default): each partition uploads its sealed batches in order
in a task of its own while the next batches are read, as a user of the raw client would; an
object is reported durable by the ``apply``, ``tick`` or ``close`` after its upload, and a
rebalance waits for the partition's upload first. Back-pressure: ``apply`` waits when a
partition holds more than ``MAX_SEALED`` sealed batches not yet uploaded and, while S3 is
unavailable, the upload keeps retrying with backoff, so the task polls nothing more meanwhile
and nothing is lost or doubled (without overlap, ``apply`` uploads what it sealed before it
returns). It stops retrying only when the partition is revoked or the task
stops (after ``advanced.shutdown_timeout``); what was not uploaded stays in Kafka and is read
again by the partition's next owner, which resumes after the last archived object.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import zstandard
from botocore.exceptions import BotoCoreError, ClientError

from connectors.s3.archive import Archive, Claim, Marker
from connectors.s3.client import client, close_quietly, code_of, status_of, transient, where
from connectors.s3.config import S3Config, S3Resource
from connectors.s3.naming import CONTENT_ENCODINGS, Layout, hour_of
from pipeline.sdk.errors import ConfigError, EndpointError, Fenced, LocalflowError
from pipeline.sdk.materialization import Applied, Batch, Materialization, Offsets
from pipeline.sdk.records import Record, TopicPartition
from pipeline.sdk.retry import Backoff

MAX_SEALED = 2
"""Sealed batches a partition may hold (one uploading, one waiting) before ``apply`` waits for its upload."""

MAX_GAPS = 64
"""An object's offsets without a line are listed in its metadata (2 KiB in all): cut batches there."""


@dataclass
class _Binding:
    collection: str
    layout: Layout
    resource: S3Resource
    index: int = 0
    """Of the binding in the materialization spec."""


@dataclass(slots=True)
class _Batch:
    """Consecutive records of one partition on their way to one object."""

    first: int
    last: int
    first_ts: int
    last_ts: int
    opened_at: float
    lines: list[bytes] = field(default_factory=list)
    size: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    """Offset ranges inside [first, last] with no line (transaction markers, dead letters)."""
    key: str = ""


class _Partition:
    """What this worker holds for one owned partition."""

    def __init__(self, tp: TopicPartition, binding: _Binding, claim: Claim) -> None:
        self.tp = tp
        self.binding = binding
        self.owner = claim.owner
        self.next = claim.next_offset
        """The next offset to take into a batch (records below it are already archived)."""
        self.durable = claim.next_offset
        self.last_hour = claim.last.hour if claim.last else None
        self.last_key = claim.last.key if claim.last else None
        self.open: _Batch | None = None
        self.sealed: list[_Batch] = []
        self.uploading: asyncio.Task[Offsets] | None = None
        """Its sealed batches being uploaded in the background (``advanced.overlap``)."""
        self.revoked = False
        self.deadline: float | None = None
        """Monotonic time after which retries stop (set when revoked or stopping)."""


class S3Materialization(Materialization):
    """Archives collections to S3; the archive's own object names are the checkpoint."""

    config: S3Config

    async def open(self) -> None:
        cfg = self.config
        self._place = f"materializations.{self.spec.name}.endpoint.s3"
        self._lock = asyncio.Lock()
        self._parts: dict[TopicPartition, _Partition] = {}
        self._error: BaseException | None = None
        self._bindings: dict[str, _Binding] = {}
        self._written: dict[int, int] = {}
        self._stored: dict[int, int] = {}
        """Documents and bytes uploaded per binding since ``apply``, ``tick`` or ``close`` last said."""
        self._dead_letters = 0
        for i, b in enumerate(self.spec.bindings):
            layout = Layout.of_binding(cfg, b.source, b.parsed)
            self._bindings[self.task.collections[b.source].topic] = _Binding(b.source, layout, b.parsed, i)
        self._stack = contextlib.AsyncExitStack()
        try:
            s3 = await self._stack.enter_async_context(client(cfg))
            self.archive = Archive(s3, cfg.bucket, cfg.advanced)
            await self.archive.ensure_bucket(cfg.create_bucket, cfg.region, f"{self._place}.bucket")
            if any(b.resource.retention_days for b in self._bindings.values()):
                await self.archive.ensure_lifecycle({b.layout.root: b.resource.retention_days
                                                     for b in self._bindings.values()})
        except BaseException as e:
            await close_quietly(self._stack)
            if isinstance(e, ClientError | BotoCoreError):
                raise EndpointError(f"S3 bucket {cfg.bucket!r} at {where(cfg)}: cannot prepare the archive: "
                                    f"{_describe(e)}") from e
            raise

    # ------------------------------------------------------------------ assignment

    async def assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Claim each partition's marker and resume after the last archived object.

        Called from the consumer's rebalance, which swallows exceptions: a failure here is
        kept and raised by the next ``apply``/``tick``, so the task restarts instead of
        silently skipping the partition.
        """
        out: dict[TopicPartition, int | None] = {}
        async with self._lock:
            # Assigned again without a revoke first: the upload of what this worker held finishes
            # (or fails, logged) before the partition is claimed anew.
            await self._uploaded([p for tp in partitions if (p := self._parts.get(tp)) is not None],
                                 wait=True, final=True)
            try:
                claims = await asyncio.gather(*(self._claim(tp) for tp in sorted(partitions)))
            except BaseException as e:
                self._error = e
                raise
            for tp, claim in zip(sorted(partitions), claims, strict=True):
                self._parts[tp] = _Partition(tp, self._bindings[tp.topic], claim)
                out[tp] = claim.next_offset
        return out

    async def _claim(self, tp: TopicPartition) -> Claim:
        layout = self._bindings[tp.topic].layout
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        backoff = self._backoff()
        while True:
            try:
                return await self.archive.claim(layout, tp.partition, owner, self.config.advanced.conditional_writes)
            except LocalflowError:
                raise
            except Exception as e:
                if not transient(e) or self.ctx.stopping.is_set():
                    raise self._endpoint_error(f"claiming {tp.topic}[{tp.partition}]", e) from e
                self._failed_attempt(f"claiming {tp.topic}[{tp.partition}]", e)
                if not await self.ctx.sleep(backoff.next()):
                    raise self._endpoint_error(f"claiming {tp.topic}[{tp.partition}] (stopping)", e) from e

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Upload what is buffered for the partitions (for at most ``shutdown_timeout``), then forget them."""
        parts = [p for tp in partitions if (p := self._parts.get(tp)) is not None]
        deadline = time.monotonic() + self.config.advanced.shutdown_timeout
        for p in parts:
            p.revoked = True  # stops a retrying apply() at its deadline
            p.deadline = deadline if p.deadline is None else min(p.deadline, deadline)
        async with self._lock:
            await self._uploaded(parts, wait=True, final=True)
            for p in parts:
                self._seal(p)
            try:
                await self._flush(parts, final=True)
            except Exception as e:  # noqa: BLE001 - a rebalance callback must not fail; Kafka keeps the data
                self.ctx.log.warning("flush of revoked partitions failed; their next owner re-reads them: %s", e)
            finally:
                for p in parts:
                    if self._parts.get(p.tp) is p:
                        del self._parts[p.tp]

    # ------------------------------------------------------------------ batches

    async def apply(self, batch: Batch) -> Applied:
        async with self._lock:
            self._raise_kept_error()
            dead: list[tuple[_Partition, Record]] = []
            current: tuple[str, int] | None = None
            part: _Partition | None = None
            for r in batch.records:
                if current != (r.topic, r.partition):
                    current = (r.topic, r.partition)
                    part = self._parts.get(TopicPartition(r.topic, r.partition))
                if part is None or (part.next is not None and r.offset < part.next):
                    continue  # not ours, or already archived (a replay): trimmed
                self._add(part, r, dead)
            for part, r in dead:
                await self.ctx.dead_letter(part.binding.collection, r.error or "not JSON", r.value,
                                           partition=r.partition, offset=r.offset, reason="invalid")
            self._dead_letters += len(dead)
            self._seal_aged()
            parts = list(self._parts.values())
            if not self.config.advanced.overlap:
                return self._applied(await self._flush(parts, final=False))
            durable = await self._uploaded(parts, wait=False)
            for part in parts:
                if not part.sealed:
                    continue
                if part.uploading is not None and len(part.sealed) > MAX_SEALED:
                    durable.update(await self._uploaded([part], wait=True))  # back-pressure
                if part.uploading is None and part.sealed:
                    # A running upload takes the batches sealed meanwhile too: one per partition, in order.
                    part.uploading = asyncio.create_task(self._upload_all(part))
            return self._applied(durable)

    async def tick(self) -> Applied:
        """An empty poll: uploads in flight are waited for, and batches past ``max_age`` uploaded."""
        async with self._lock:
            self._raise_kept_error()
            parts = list(self._parts.values())
            durable = await self._uploaded(parts, wait=True)
            self._seal_aged()
            return self._applied(durable | await self._flush(parts, final=False))

    async def _upload_all(self, part: _Partition) -> Offsets:
        """The partition's upload task: its sealed batches, those sealed while it runs included (it
        ends in the same step as it sees none left, so ``apply`` never finds it ending and idle)."""
        durable: Offsets = {}
        while part.sealed:
            uploaded = await self._flush([part], final=False)
            if not uploaded:
                break  # retrying had to stop (revoked or stopping): logged by _flush
            durable |= uploaded
        return durable

    async def _uploaded(self, parts: list[_Partition], *, wait: bool, final: bool = False) -> Offsets:
        """The offsets made durable by the partitions' finished uploads (all of them: ``wait``). A failed
        upload is raised (``final``: logged; the partition's next owner re-reads what it held)."""
        durable: Offsets = {}
        for part in parts:
            task = part.uploading
            if task is None or not (wait or task.done()):
                continue
            try:
                durable.update(await task)
            except Exception as e:
                if not final:
                    raise
                self.ctx.log.warning("%s[%d]: an upload failed (%s); the next owner re-reads what it held",
                                     part.tp.topic, part.tp.partition, e)
            finally:
                part.uploading = None
        return durable

    def _applied(self, durable: Offsets) -> Applied:
        """What was uploaded since last said (revoked partitions' uploads included), with ``durable``."""
        out = Applied(durable, documents=self._written, dead=self._dead_letters, stored_bytes=self._stored)
        self._written, self._stored, self._dead_letters = {}, {}, 0
        return out

    async def close(self, failed: bool) -> Applied:
        """Upload open batches unless the task failed (at most ``shutdown_timeout``), then disconnect."""
        durable: Offsets = {}
        try:
            parts = list(self._parts.values())
            if failed:
                uploads = [p.uploading for p in parts if p.uploading is not None]
                for task in uploads:
                    task.cancel()  # as a crash would: the archive's markers say what is there
                await asyncio.gather(*uploads, return_exceptions=True)
            elif parts:
                deadline = time.monotonic() + self.config.advanced.shutdown_timeout
                async with self._lock:
                    for p in parts:
                        p.deadline = deadline if p.deadline is None else min(p.deadline, deadline)
                    durable = await self._uploaded(parts, wait=True, final=True)
                    for p in parts:
                        self._seal(p)
                    durable |= await self._flush(parts, final=True)
        finally:
            self._parts = {}
            await close_quietly(self._stack)
        return self._applied(durable)

    def _add(self, part: _Partition, r: Record, dead: list[tuple[_Partition, Record]]) -> None:
        b = part.open
        offset = r.offset
        if b is None:
            b = part.open = _Batch(offset, offset - 1, r.timestamp_ms, r.timestamp_ms, time.monotonic())
        elif offset != b.last + 1:
            b.gaps.append((b.last + 1, offset - 1))
        b.last = offset
        b.last_ts = r.timestamp_ms
        part.next = offset + 1
        if r.error is None:
            value = r.value
            if b"\n" in value:
                value = orjson.dumps(r.doc)
            b.lines.append(value)
            b.size += len(value) + 1
        else:
            dead.append((part, r))
            if b.gaps and b.gaps[-1][1] == offset - 1:
                b.gaps[-1] = (b.gaps[-1][0], offset)
            else:
                b.gaps.append((offset, offset))
        res = part.binding.resource
        if len(b.lines) >= res.max_documents or b.size >= res.max_bytes or len(b.gaps) >= MAX_GAPS:
            self._seal(part)

    def _seal(self, part: _Partition) -> None:
        """Fix the open batch's object key; from now on it is uploaded under that name only."""
        b = part.open
        if b is None:
            return
        part.open = None
        hour = hour_of(b.first_ts)
        if part.last_hour is not None and hour < part.last_hour:
            hour = part.last_hour  # hours never go back within a partition (see naming)
        part.last_hour = hour
        b.key = part.binding.layout.object_key(hour, part.tp.partition, b.first, b.last)
        part.sealed.append(b)

    def _seal_aged(self) -> None:
        now = time.monotonic()
        for part in self._parts.values():
            if part.open is not None and now - part.open.opened_at >= part.binding.resource.max_age:
                self._seal(part)

    # ------------------------------------------------------------------ uploads

    async def _flush(self, parts: list[_Partition], *, final: bool) -> Offsets:
        """Upload the sealed batches of ``parts`` (partitions side by side); offsets now durable.

        ``final`` (revoke, close): giving up or being fenced is logged, not raised.
        """
        parts = [p for p in parts if p.sealed]
        before = {p.tp: p.durable for p in parts}
        results = await asyncio.gather(*(self._drain(p) for p in parts), return_exceptions=True)
        for part, result in zip(parts, results, strict=True):
            lost = sum(len(b.lines) for b in part.sealed) + (len(part.open.lines) if part.open else 0)
            if isinstance(result, BaseException):
                if not final and not part.revoked:
                    raise result
                self.ctx.log.warning("%s[%d]: %d documents not archived (%s); the next owner re-reads them",
                                     part.tp.topic, part.tp.partition, lost, result)
            elif result is False:
                if not final and not part.revoked:
                    raise EndpointError(f"S3 bucket {self.config.bucket!r} stayed unavailable while stopping: "
                                        f"{lost} documents of {part.tp.topic}[{part.tp.partition}] are not "
                                        "archived; they stay in Kafka and are archived on the next start")
                self.ctx.log.warning("%s[%d]: S3 unavailable, %d documents not archived; they stay in Kafka "
                                     "for the partition's next owner", part.tp.topic, part.tp.partition, lost)
        return {p.tp: p.durable for p in parts if p.durable is not None and p.durable != before[p.tp]}

    async def _drain(self, part: _Partition) -> bool:
        """Upload the partition's sealed batches in order; False when retrying had to stop."""
        while part.sealed:
            if not await self._upload(part, part.sealed[0]):
                return False
            done = part.sealed.pop(0)
            part.durable = done.last + 1
        return True

    async def _upload(self, part: _Partition, b: _Batch) -> bool:
        """Check we still own the partition, upload the object, move the marker; retry while transient."""
        cfg = self.config
        binding = part.binding
        compression = binding.resource.compression
        body, digest = await asyncio.to_thread(encode, b.lines, compression)
        metadata = {
            "documents": str(len(b.lines)), "first-offset": str(b.first), "last-offset": str(b.last),
            "first-timestamp": _iso(b.first_ts), "last-timestamp": _iso(b.last_ts), "sha256": digest,
            "collection": binding.collection, "topic": part.tp.topic, "partition": str(part.tp.partition),
            "writer": part.owner,
        }
        if b.gaps:
            metadata["gaps"] = ",".join(f"{lo}-{hi}" for lo, hi in b.gaps)
        key = b.key if b.lines else part.last_key  # only dead letters: no object, the marker moves on
        uploaded = not b.lines
        backoff = self._backoff()
        layout = binding.layout
        while True:
            try:
                etag = await self.archive.check_owner(layout, part.tp.partition, part.owner)
                if not uploaded:
                    await self.archive.put(b.key, body, CONTENT_ENCODINGS[compression], metadata)
                    uploaded = True
                    self._stored[binding.index] = self._stored.get(binding.index, 0) + len(body)
                    self._written[binding.index] = self._written.get(binding.index, 0) + len(b.lines)
                marker = Marker(next_offset=b.last + 1, key=key, owner=part.owner)
                await self.archive.write_marker(layout, part.tp.partition, marker, etag=etag,
                                                conditional=cfg.advanced.conditional_writes)
                part.last_key = key
                return True
            except Fenced as e:
                if uploaded and b.lines:
                    self.ctx.log.warning("fenced after uploading %s: it may overlap the new owner's objects; "
                                         "readers de-duplicate by offset (verify)", b.key)
                raise Fenced(f"{part.tp.topic}[{part.tp.partition}]: {e}") from e
            except ClientError as e:
                if code_of(e) == "NoSuchBucket" and cfg.create_bucket:
                    await self.archive.create_bucket(cfg.region)  # e.g. a local store that was reset
                    continue
                if code_of(e) == "NoSuchBucket":
                    raise ConfigError(f"S3 bucket {cfg.bucket!r} does not exist (any more): create it, or set "
                                      "create_bucket: true", f"{self._place}.bucket") from e
                if not transient(e):
                    raise self._endpoint_error(f"uploading {b.key}", e) from e
                self._failed_attempt(f"uploading {b.key}", e)
            except Exception as e:
                if not transient(e):
                    raise
                self._failed_attempt(f"uploading {b.key}", e)
            if not await self._wait(part, backoff.next()):
                return False

    async def _wait(self, part: _Partition, delay: float) -> bool:
        """Sleep before the next attempt; False when the partition's deadline has passed."""
        now = time.monotonic()
        if self.ctx.stopping.is_set() and part.deadline is None:
            part.deadline = now + self.config.advanced.shutdown_timeout
        if part.deadline is not None:
            if now >= part.deadline:
                return False
            delay = min(delay, part.deadline - now)
        await asyncio.sleep(delay)  # not ctx.sleep: a stopping task still flushes, up to its deadline
        return True

    # ------------------------------------------------------------------ errors

    def _backoff(self) -> Backoff:
        retry = self.config.advanced.retry
        return Backoff(initial=retry.initial_backoff, maximum=retry.max_backoff)

    def _failed_attempt(self, what: str, e: BaseException) -> None:
        self.ctx.report(self._endpoint_error(what, e))
        self.ctx.log.warning("S3 at %s unavailable while %s, retrying: %s", where(self.config), what, _describe(e))

    def _endpoint_error(self, what: str, e: BaseException) -> EndpointError:
        return EndpointError(f"S3 bucket {self.config.bucket!r} at {where(self.config)}: {what} failed: "
                             f"{_describe(e)}")

    def _raise_kept_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def encode(lines: list[bytes], compression: str) -> tuple[bytes, str]:
    """The object body and the SHA-256 (hex) of its JSON lines before compression.

    Deterministic, so a retried upload rewrites identical bytes (gzip with mtime 0).
    """
    raw = b"\n".join(lines) + b"\n" if lines else b""
    digest = hashlib.sha256(raw).hexdigest()
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0), digest
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw), digest
    return raw, digest


def _iso(timestamp_ms: float) -> str:
    return datetime.fromtimestamp(max(timestamp_ms, 0) / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _describe(e: BaseException) -> str:
    if isinstance(e, ClientError):
        return f"HTTP {status_of(e)} {code_of(e)}"
    return f"{type(e).__name__}: {e}"
