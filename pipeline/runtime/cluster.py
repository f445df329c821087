"""Cluster mode (``localflow run --cluster NAME``): N identical workers share a catalog over Kafka.

No protocol of our own: Kafka's group protocol does the membership, the failure detection and
the fencing, as Kafka Connect's distributed mode does.

* Derivations and materializations run on every worker. Their consumer groups
  (``localflow.<task>``) already spread partitions over the members and fence a replaced one
  (derived documents carry their source position; endpoints store their own offsets).
* Captures are singletons held by a **lease**. The topic ``localflow.cluster.<NAME>.leases``
  has one partition per capture of the effective catalog, in sorted name order (partition i
  is the i-th capture name); every worker joins the group ``localflow.cluster.<NAME>``
  subscribed to it, and holding partition i *is* holding capture i's lease. The assignor
  gives each partition to exactly one member, so one worker runs a capture at a time.
  Nothing is ever written to or read from that topic: its partitions are the leases.
* A rebalance (a worker joins, leaves, or misses the session timeout) revokes every lease
  first: the revocation callback stops the captures and waits until they flushed and saved
  their checkpoint, and only then does this worker rejoin, so the next holder starts from
  that checkpoint. A worker killed with -9 holds nothing after the session timeout; the
  survivors take its captures over from the last checkpoint.
* The **epoch** of a lease is the group's generation when it was assigned (aiokafka keeps it
  in the consumer's coordinator). A capture saves every checkpoint with it
  (``pipeline.runtime.checkpoint.next_epoch``), and the checkpoint reader ignores records of a lower
  epoch than the highest it sees, so a worker that stalled past the session timeout (SIGSTOP,
  a long pause) and wakes still running its capture cannot move the checkpoint back. It also
  stops before its next item: ``Lease.check`` compares the epoch with the coordinator's
  generation, which aiokafka resets as soon as a heartbeat is refused; and it polls nothing
  more: a ticker notices the freeze, and the capture's interval sleep (``ctx.sleep``) waits
  for the heartbeat's answer before the next poll (``Lease.confirmed``). The documents it may
  still send in between (a poll in flight when it froze) carry the same keys as its
  successor's (captures' keys are derived from the source records), so endpoints hold each
  key once.

The presence check of a capture (``pipeline.runtime.checkpoint.Presence``) stays on in a cluster: the
lease decides which worker runs it, presence refuses a second instance started outside the
cluster (a per-task container of the same catalog). It costs nothing at a takeover: a dead
holder's presence expires (10 s) by the time its session does.

Capture i (in sorted name order) is held through partition ``i mod P`` of the P partitions the
lease topic has: one each when P is the number of captures, as created. Adding a capture
(through the API or the file) grows the topic, which makes the group rebalance and reassign
every lease under the new mapping; a broker that cannot add partitions (Tansu 0.6 has no
CreatePartitions) keeps P, and the holder of a partition then runs every capture mapped to it.
Removing a capture shifts the mapping without a rebalance: a holder whose capture moved to
another partition stops it at its next item (``Lease.check``), and the new holder starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from aiokafka.errors import KafkaError

from pipeline.runtime.catalog import Catalog, KafkaConfig
from pipeline.runtime.collection import Admin
from pipeline.sdk.errors import AlreadyRunning, EndpointError

log = logging.getLogger("localflow.cluster")

SESSION_TIMEOUT_MS = 10_000
"""How long a silent worker keeps its leases: the takeover time after a kill -9 is about this."""
HEARTBEAT_MS = 1_000
REBALANCE_TIMEOUT_MS = 60_000
"""How long the group waits for members to rejoin: a revoked capture flushes within it."""


def leases_topic(cluster: str) -> str:
    return f"localflow.cluster.{cluster}.leases"


def group_of(cluster: str) -> str:
    return f"localflow.cluster.{cluster}"


class LeaseLost(AlreadyRunning):
    """This worker no longer holds the capture's lease: another one runs it (or will, after the rebalance)."""


@dataclass(frozen=True)
class Lease:
    """One capture's lease as this worker received it: its partition and the generation (epoch)."""

    task: str
    partition: int
    generation: int
    cluster: Cluster

    @property
    def fencing_generation(self) -> int:
        """The generation part of the capture's checkpoint epoch: ``generation + 1``, as 0 means "no
        cluster" there and group generations start at 0 on some brokers."""
        return self.generation + 1

    async def confirmed(self) -> None:
        """Return once the lease is known to be still held; raise LeaseLost when it is not.

        Right after this process was frozen (SIGSTOP, a VM pause) for longer than the session
        timeout's half, the group may have given the lease away without this worker knowing yet:
        wait until the heartbeat sent at wake-up has had its answer (aiokafka resets the
        generation when it is refused) before the capture polls again."""
        wait = self.cluster.since_freeze()
        if wait:
            await asyncio.sleep(wait)  # two heartbeats after waking: the group's answer has come by then
        self.check()

    def check(self) -> None:
        """Raise LeaseLost unless this worker still holds the lease at the same generation."""
        if not self.cluster.still_holds(self):
            raise LeaseLost(f"capture {self.task!r}: lease {self.cluster.topic}[{self.partition}] of generation "
                            f"{self.generation} lost (a rebalance took it, or this worker missed the group's "
                            f"session timeout); the capture stops and writes nothing more")


class _Leases(ConsumerRebalanceListener):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.cluster._revoked()  # noqa: SLF001 - the listener is part of the cluster

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.cluster._assigned({tp.partition for tp in assigned})  # noqa: SLF001


class Cluster:
    """This worker's membership in a cluster: which capture leases it holds, at which generation.

    ``catalog`` returns the effective catalog (its captures define the lease order);
    ``changed`` asks the runner to reconcile (start or stop captures); ``settled`` waits until
    it has. ``holds``/``lease`` are what the runner asks before it starts a capture.
    """

    def __init__(self, kafka: KafkaConfig, name: str, catalog: Callable[[], Catalog], *,
                 changed: Callable[[], None], settled: Callable[[], Awaitable[None]],
                 session_timeout_ms: int = SESSION_TIMEOUT_MS) -> None:
        self.kafka, self.name = kafka, name
        self.topic, self.group = leases_topic(name), group_of(name)
        self.catalog, self.changed, self.settled = catalog, changed, settled
        self.session_timeout_ms = session_timeout_ms
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.held: dict[int, int] = {}
        """Lease partition -> the generation it was assigned in."""
        self.assigned_at: float | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._loop: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False
        self._cannot_grow = 0
        self._tick = time.monotonic()
        self._woke = -1e9

    # ------------------------------------------------------------------ what the runner asks

    def order(self) -> list[str]:
        return sorted(self.catalog().captures)

    def partition_of(self, name: str) -> int | None:
        """The lease partition of a capture (None: not a capture of the effective catalog)."""
        order = self.order()
        return order.index(name) % self.partitions() if name in order else None

    def partitions(self) -> int:
        """The lease topic's partition count, as this member's metadata has it (1 before it is known)."""
        known = self._consumer.partitions_for_topic(self.topic) if self._consumer is not None else None
        return len(known) if known else 1

    def holds(self, name: str) -> bool:
        return self.partition_of(name) in self.held

    def lease(self, name: str) -> Lease | None:
        partition = self.partition_of(name)
        if partition is None or partition not in self.held:
            return None
        return Lease(name, partition, self.held[partition], self)

    def still_holds(self, lease: Lease) -> bool:
        return (lease.generation >= 0 and self.generation() == lease.generation
                and self.held.get(lease.partition) == lease.generation and self.partition_of(lease.task) == lease.partition)

    def held_captures(self, partitions: set[int] | dict[int, int]) -> list[str]:
        return [name for name in self.order() if self.partition_of(name) in partitions]

    def generation(self) -> int:
        """The group generation this member is in now (-1 while it is not in the group; Tansu counts from 0,
        Apache Kafka from 1)."""
        generation = getattr(getattr(self._consumer, "_coordinator", None), "generation", None)
        return -1 if generation is None else int(generation)

    def since_freeze(self) -> float:
        """Seconds to wait before trusting the leases again: 0 unless this process was just frozen long
        enough to have been dropped from the group (the ticker saw the gap, or has not run since it);
        else what remains of two heartbeats after waking."""
        now, settle = time.monotonic(), 2 * HEARTBEAT_MS / 1000
        if now - self._tick > self.session_timeout_ms / 2000:
            return settle
        return max(0.0, settle - (now - self._woke))

    async def _ticking(self) -> None:
        while True:
            await asyncio.sleep(0.25)  # the freeze detector's resolution
            now = time.monotonic()
            if now - self._tick > self.session_timeout_ms / 2000:
                self._woke = now
                log.warning("cluster %s: this worker was frozen for %.1fs (session timeout %gs); its captures "
                            "wait for the group's word on their leases", self.name, now - self._tick,
                            self.session_timeout_ms / 1000)
            self._tick = now

    def member_id(self) -> str:
        coordinator = getattr(self._consumer, "_coordinator", None)
        return str(getattr(coordinator, "member_id", "") or "")

    def view(self) -> dict[str, Any]:
        """What this worker holds, for the worker registry and /status."""
        return {"name": self.name, "group": self.group, "member": self.member_id(), "generation": self.generation(),
                "leases": {name: {"partition": p, "epoch": self.held[p]} for name in self.held_captures(self.held)
                           if (p := self.partition_of(name)) is not None}}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create or grow the lease topic, then join the group (leases come with the first assignment)."""
        wanted = len(self.order())
        try:
            await self._ensure_partitions(wanted)
        except EndpointError as e:  # a broker that cannot grow it: captures share partitions (i mod P)
            self._cannot_grow = wanted
            log.warning("cluster %s: %s; captures share the lease partitions the topic has", self.name, e)
        self._consumer = AIOKafkaConsumer(
            **self.kafka.client_options(), group_id=self.group, enable_auto_commit=False,
            session_timeout_ms=self.session_timeout_ms, heartbeat_interval_ms=HEARTBEAT_MS,
            rebalance_timeout_ms=REBALANCE_TIMEOUT_MS, max_poll_interval_ms=REBALANCE_TIMEOUT_MS * 5,
            fetch_max_wait_ms=500, auto_offset_reset="earliest")
        try:
            await self._consumer.start()
        except KafkaError as e:
            await self._consumer.stop()
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: cannot join cluster {self.name!r} "
                                f"(group {self.group}): {e!r}") from e
        self._consumer.subscribe([self.topic], listener=_Leases(self))
        self._loop = asyncio.create_task(self._poll(), name=f"localflow-cluster-{self.name}")
        self._tick = time.monotonic()
        self._ticker = asyncio.create_task(self._ticking(), name=f"localflow-cluster-{self.name}-ticker")
        log.info("worker %s joined cluster %s (group %s, leases in %s)", self.worker, self.name, self.group, self.topic)

    async def stop(self) -> None:
        """Leave the group (after the runner stopped the captures): the others rebalance at once."""
        self._closing = True
        for task in (self._loop, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._consumer is not None:
            await self._consumer.stop()
        self.held.clear()

    async def _poll(self) -> None:
        """Keep the membership alive (aiokafka leaves a group its consumer stops polling) and the
        lease topic as wide as the capture list."""
        assert self._consumer is not None
        while True:
            try:
                await self._consumer.getmany(timeout_ms=1000)  # the topic stays empty: this only keeps membership
                wanted = len(self.order())
                if wanted > self.partitions() and wanted != self._cannot_grow:
                    try:
                        await self._ensure_partitions(wanted)
                    except EndpointError as e:
                        self._cannot_grow = wanted  # tried once for this count: captures share partitions meanwhile
                        log.warning("cluster %s: %s; the %d captures share its %d lease partitions (capture i is "
                                    "held through partition i mod %d)", self.name, e, wanted, self.partitions(),
                                    self.partitions())
            except (KafkaError, EndpointError) as e:
                log.warning("cluster %s: %s", self.name, e)
                await asyncio.sleep(1.0)  # the broker is away: retry at its pace

    async def _ensure_partitions(self, count: int) -> None:
        count = max(1, count)
        await Admin(self.kafka).ensure({self.topic: (count, 1, {})})
        admin = AIOKafkaAdminClient(**self.kafka.client_options())
        try:
            await admin.start()
            [described] = (await admin.describe_topics([self.topic]))
            have = len(described.get("partitions") or ())
            if have < count:
                await admin.create_partitions({self.topic: NewPartitions(total_count=count)})
                log.info("cluster %s: lease topic %s grown to %d partitions (one per capture)", self.name,
                         self.topic, count)
        except KafkaError as e:
            raise EndpointError(f"Kafka at {self.kafka.bootstrap_servers}: cannot give {self.topic} {count} "
                                f"partitions (one per capture): {e!r}") from e
        finally:
            await admin.close()

    # ------------------------------------------------------------------ rebalances

    async def _revoked(self) -> None:
        """Stop every capture of this worker, and wait until they flushed, before the group moves on."""
        if not self.held:
            return
        names = self.held_captures(self.held)
        self.held.clear()
        if self._closing:
            return  # the runner already stopped everything
        started = time.monotonic()
        self.changed()
        try:
            await asyncio.wait_for(self.settled(), timeout=REBALANCE_TIMEOUT_MS / 1000 / 2)
        except TimeoutError:
            log.error("cluster %s: captures %s did not stop within %gs of losing their leases", self.name,
                      ", ".join(names), REBALANCE_TIMEOUT_MS / 1000 / 2)
        log.info("cluster %s: released leases of %s in %.1fs (rebalance)", self.name, ", ".join(names) or "-",
                 time.monotonic() - started)

    def _assigned(self, partitions: set[int]) -> None:
        generation = self.generation()
        self.held = dict.fromkeys(partitions, generation)
        self.assigned_at = time.time()
        names = self.held_captures(partitions)
        log.info("cluster %s: generation %d: this worker holds the leases of %s", self.name, generation,
                 ", ".join(names) or "no capture")
        self.changed()


class Membership:
    """The cluster membership of ``run --cluster``; ``stop`` leaves once the tasks stopped."""

    def __init__(self, cluster: Cluster, joining: asyncio.Task[None]) -> None:
        self.cluster, self.joining = cluster, joining

    async def stop(self) -> None:
        self.joining.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.joining
        await self.cluster.stop()


def join(name: str, catalog: Catalog, controller: Any, telemetry: Any, stopping: asyncio.Event,
         runner: asyncio.Task[None]) -> Membership:
    """Join cluster ``name`` in the background (retried while Kafka is away) for ``run --cluster``:
    the controller runs captures only while this worker holds their leases."""
    def changed() -> None:
        controller.request()
        if telemetry is not None:
            telemetry.renew()

    async def settled() -> None:
        if stopping.is_set():  # shutting down: the captures stop with everything else
            await asyncio.wait({runner})
        else:
            await controller.settle()

    cluster = Cluster(catalog.kafka, name, lambda: controller.catalog, changed=changed, settled=settled)
    controller.cluster = cluster
    if telemetry is not None:
        telemetry.cluster = cluster

    async def attempt() -> None:
        delay = 1.0
        while not stopping.is_set():
            try:
                await cluster.start()
                return
            except EndpointError as e:
                log.warning("cannot join cluster %s yet (captures wait for their leases): %s", name, e)
                await asyncio.sleep(delay)  # backoff while the broker is away
                delay = min(delay * 2, 30.0)

    return Membership(cluster, asyncio.create_task(attempt(), name="localflow-cluster-join"))
