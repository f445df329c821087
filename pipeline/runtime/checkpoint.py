"""Capture checkpoints, stored in Kafka so a capture container needs no volume.

Materializations keep their checkpoints in their own endpoint, in the same transaction as the
data (Postgres table, Redis script, S3 object names); captures keep theirs here: one small
compacted topic per capture task (``localflow.checkpoints.<task>``), keyed by the task. The
latest checkpoint is the topic's last record, so loading reads one record whatever the
history (brokers that never compact, such as Tansu, keep every old checkpoint; nothing reads
them). A checkpoint is written only after the documents it covers were acknowledged.

Fencing: every record carries the ``epoch`` of the instance that wrote it, and the reader
takes the newest record of the highest epoch in the tail, ignoring records of a lower one, so
a writer that lost its lease (stalled past the session timeout, then resumed) cannot move the
checkpoint back. An epoch is ``era << 32 | generation``: in a cluster the generation is the
lease group's (``pipeline.runtime.cluster``), which only grows while the group lives; a new era starts
when a writer finds its generation not above the tail's (the group was recreated) and at every
start outside a cluster (generation 0), whose single instance is guaranteed by ``Presence``.
Records written before epochs existed count as epoch 0.

One instance per capture: two replicas of a capture would poll twice and race on one
checkpoint, so each running instance announces itself (``Presence``) in the capture's presence
topic (``localflow.checkpoints.<task>.presence``, beside its checkpoints), and an instance that
finds another one live refuses to start (``AlreadyRunning``). Until captures hold a lease, that
is the rule outside a cluster: run one container per capture. In a cluster (``localflow run
--cluster``) a lease held through Kafka's group protocol picks the worker (``pipeline.runtime.cluster``);
presence stays on there too, so an instance started outside the cluster is still refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from pipeline.runtime.catalog import KafkaConfig, topic_of
from pipeline.runtime.collection import Admin, CollectionWriter
from pipeline.runtime.offsets import beginning_offsets, high_watermarks, partitions_of, probe_consumer
from pipeline.sdk.errors import AlreadyRunning, CheckpointError, EndpointError
from pipeline.sdk.records import Record

CHECKPOINT_PREFIX = "localflow.checkpoints."
PRESENCE_SUFFIX = ".presence"
log = logging.getLogger("localflow.checkpoint")
_TAIL = 32  # records read back from the end: a compacted tail may hold gaps, a fenced writer a few stale records
ERA_SHIFT = 32


def next_epoch(highest: int, generation: int) -> int:
    """The epoch of a writer with this lease ``generation`` (0: no cluster), above every stale one.

    Same era while the generation grows past the tail's; a new era otherwise (see the module docstring).
    """
    era, seen = highest >> ERA_SHIFT, highest & ((1 << ERA_SHIFT) - 1)
    if generation <= seen:  # also every start outside a cluster (generation 0)
        era += 1
    return era << ERA_SHIFT | max(generation, 0)


def describe_epoch(epoch: int) -> str:
    """``era 2, generation 7``: an epoch in words, for logs."""
    return f"era {epoch >> ERA_SHIFT}, generation {epoch & ((1 << ERA_SHIFT) - 1)}"


class CaptureCheckpoint(BaseModel):
    """The stored envelope; ``state`` is the capture's own (e.g. file offsets, an API cursor)."""

    version: Literal[1] = 1
    task: str
    state: dict[str, Any]
    written_at: str
    epoch: int = 0
    """The writer's fencing epoch (see the module docstring); 0 for records older than epochs."""

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
        """The last checkpoint ``task`` saved at the highest epoch; None when it never saved one.

        Records of a lower epoch than the highest in the tail are ignored (a fenced writer's).
        Raises CheckpointError when the last record is unreadable: a broken checkpoint is
        reported, never silently reset (that would re-capture or skip data).
        """
        return (await self._fenced(task))[0]

    async def _fenced(self, task: str) -> tuple[CaptureCheckpoint | None, int]:
        """The winning checkpoint of the tail and how many newer records it overrides as stale."""
        records = await self.tail(self.topic(task), _TAIL)
        if not records or not records[-1].value:
            return None, 0
        parsed: list[CaptureCheckpoint] = []
        for i, record in enumerate(records):
            if not record.value:
                parsed.clear()  # a tombstone deletes what came before it
                continue
            try:
                parsed.append(CaptureCheckpoint.model_validate_json(record.value))
            except ValidationError as e:
                if i < len(records) - 1:
                    continue  # an older unreadable record: a newer one supersedes it
                raise CheckpointError(
                    f"checkpoint of task {task!r} at {record.topic}[{record.partition}]@{record.offset} is "
                    f"unreadable: {e.errors(include_url=False)[0]['msg']}; fix or delete it deliberately "
                    f"(localflow will not reset it silently)") from None
        if not parsed:
            return None, 0
        top = max(c.epoch for c in parsed)
        index = max(i for i, c in enumerate(parsed) if c.epoch == top)
        return parsed[index], len(parsed) - 1 - index

    async def load(self, task: str) -> dict[str, Any] | None:
        """The state of the latest checkpoint (see ``latest``)."""
        return (await self.resume(task))[0]

    async def resume(self, task: str) -> tuple[dict[str, Any] | None, int]:
        """The state to resume from and the highest epoch so far (a new writer's epoch must exceed it)."""
        await self.ensure(task)
        checkpoint, stale = await self._fenced(task)
        if checkpoint is None:
            return None, 0
        if stale:
            log.warning("checkpoint of task %s: ignored %d newer record(s) of a lower epoch than %s (written by "
                        "an instance that had lost its lease)", task, stale, describe_epoch(checkpoint.epoch))
        return checkpoint.state, checkpoint.epoch

    async def save(self, writer: CollectionWriter, task: str, state: dict[str, Any], *, epoch: int = 0) -> None:
        """Write ``state`` for ``task`` at ``epoch`` and wait for the broker's acknowledgement."""
        envelope = {"version": 1, "task": task, "state": state, "epoch": epoch,
                    "written_at": datetime.now(UTC).isoformat().replace("+00:00", "Z")}
        topic = self.topic(task)
        try:
            await (await writer.producer.send(topic, orjson.dumps(envelope), key=task.encode()))
        except KafkaError as e:
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: checkpoint of task {task!r} "
                                f"not acknowledged by {topic}: {e!r}") from e

    async def tail(self, topic: str, count: int) -> list[Record]:
        """The last ``count`` records of a one-partition topic ([] when it is empty or missing)."""
        async with probe_consumer(self.kafka, partition_fetch_bytes=16 * 1024 * 1024) as consumer:
            tps = await partitions_of(consumer, topic)
            if not tps:
                return []
            tp = tps[0]
            end = (await high_watermarks(consumer, [tp]))[tp]
            begin = (await beginning_offsets(consumer, [tp]))[tp]
            if end <= begin:
                return []
            consumer.seek(tp, max(begin, end - count))
            out = []
            try:
                while await consumer.position(tp) < end:
                    for m in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                        if m.offset < end:
                            out.append(Record(tp.topic, tp.partition, m.offset, m.timestamp, m.key, m.value))
            except KafkaError as e:
                raise EndpointError(f"Kafka: cannot read topic {topic}: {e!r}") from e
            return out


class Presence:
    """This instance's announcement in its capture's presence topic (see the module docstring).

    Records are ``{"instance", "task", "kind": claim | beat | left}``. An instance is *live* while
    its last record is not ``left`` and is younger than ``TTL`` (record timestamps: the machines'
    clocks must agree to within a few seconds, as NTP keeps them); the *holder* is the live
    instance that claimed first (one whose claim is older than the tail read claimed first of
    all). When another instance holds the capture, ``enter`` watches it: a new record from it
    (it beats every ``BEAT`` seconds) proves it alive, and ``enter`` refuses; a holder that
    falls silent for the TTL was killed, and ``enter`` goes on (so a replacement started right
    after a kill -9 waits, without an error, until the TTL has passed). Then it claims and reads
    back (of two instances starting at once, the earlier claim wins, and both see it), and beats.
    ``check`` raises once another instance holds it (this one stalled past the TTL). A stop
    writes ``left``, so a replacement starts at once.
    """

    TTL = 10.0
    BEAT = 2.0
    _WINDOW = 64  # records read back: some TTLs' worth of beats of a few instances

    def __init__(self, store: KafkaCheckpoints, task: str, replication_factor: int = 1) -> None:
        self.store = store
        self.task = task
        self.topic = store.topic(task) + PRESENCE_SUFFIX
        self.instance = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.replication_factor = replication_factor
        self._writer: CollectionWriter | None = None
        self._beats: asyncio.Task[None] | None = None
        self._lost: str | None = None

    async def enter(self, writer: CollectionWriter, stopping: asyncio.Event | None = None) -> None:
        await self.store._admin.ensure({self.topic: (1, self.replication_factor, {"retention.ms": "86400000"})})  # noqa: SLF001
        stopping = stopping or asyncio.Event()
        await self._outlive(stopping)
        if stopping.is_set():
            return
        self._writer = writer
        await self._send("claim")
        holder = await self.holder()
        if holder is not None:
            await self._send("left")
            self._writer = None
            raise AlreadyRunning(self._refusal(holder))
        self._beats = asyncio.create_task(self._beat(), name=f"localflow-presence-{self.task}")

    def check(self) -> None:
        """Raise AlreadyRunning once another instance holds the capture."""
        if self._lost is not None:
            raise AlreadyRunning(self._lost)

    async def leave(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._beats
            self._beats = None
        if self._writer is not None and self._lost is None:
            with contextlib.suppress(EndpointError):
                await self._send("left")
        self._writer = None

    async def _outlive(self, stopping: asyncio.Event) -> None:
        """Return once no other instance holds the capture; AlreadyRunning when one shows it is alive."""
        seen = await self._live()
        if seen is not None:
            log.info("capture %s: instance %s held it %.1fs ago; waiting to see whether it is alive", self.task,
                     seen[0], time.time() - seen[1] / 1000)
        while seen is not None and not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.BEAT / 4)  # the watching period
            now = await self._live()
            if now is not None and now[0] == seen[0] and now[1] > seen[1]:
                raise AlreadyRunning(self._refusal(seen[0]))
            seen = now

    async def holder(self) -> str | None:
        """The live instance that holds the capture, other than this one (None: nobody else)."""
        live = await self._live()
        return None if live is None else live[0]

    async def _live(self) -> tuple[str, int] | None:
        """The live instance that holds the capture, other than this one, and its last record's time (ms)."""
        first: dict[str, int] = {}
        last: dict[str, tuple[str, int]] = {}
        for r in await self.store.tail(self.topic, self._WINDOW):
            try:
                v = orjson.loads(r.value)
                instance, kind = str(v["instance"]), str(v["kind"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            first.setdefault(instance, r.offset if kind == "claim" else -1)
            last[instance] = (kind, r.timestamp_ms)
        now = time.time() * 1000
        live = [i for i, (kind, at) in last.items() if kind != "left" and now - at < self.TTL * 1000]
        if not live:
            return None
        holder = min(live, key=lambda i: first[i])
        return None if holder == self.instance else (holder, last[holder][1])

    async def _send(self, kind: str) -> None:
        assert self._writer is not None
        value = orjson.dumps({"instance": self.instance, "task": self.task, "kind": kind})
        try:
            await (await self._writer.producer.send(self.topic, value, key=self.instance.encode()))
        except KafkaError as e:
            raise EndpointError(f"Kafka: presence of capture {self.task!r} not acknowledged by {self.topic}: "
                                f"{e!r}") from e

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.BEAT)  # the heartbeat period
            try:
                await self._send("beat")
                holder = await self.holder()
            except EndpointError as e:
                log.warning("presence of capture %s: %s", self.task, e)  # the capture's own writes fail too
                continue
            if holder is not None:
                self._lost = self._refusal(holder)
                return

    def _refusal(self, holder: str) -> str:
        return (f"capture {self.task!r} is already running elsewhere (instance {holder}, seen in {self.topic} "
                f"within {self.TTL:g}s). A capture runs as one instance (two would poll twice and race on one "
                f"checkpoint): stop the other; this one retries and starts once the other has left")
