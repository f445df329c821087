"""`localflow replay`: re-read collections into a materialization to backfill it.

How it stays out of a running worker's way: replay runs the materialization's own task
(``MaterializationTask``) in this process, as one more member of its consumer group
``localflow.<task>``, with three runtime options (documented in ``pipeline.runtime.materialization``):
``start_offsets`` overrides where each replayed partition starts (``assigned()`` is still
called, so the connector fences as on any rebalance), ``stop_at_end`` makes it return once the
partitions it holds are read up to the high watermark captured when replay started (or the
endpoint's stored offset, if further), and ``progress`` reports how far it got. The endpoint's
checkpoint therefore moves only through the connector's usual transactions and never ends
behind where it was; a worker that takes a partition over mid-replay resumes from it.

Stop the materialization's workers before replaying: partitions a worker holds are not
replayed (the summary names them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import TopicPartition
from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pipeline.runtime.catalog import Catalog
from pipeline.runtime.collection import Collection
from pipeline.runtime.offsets import (
    beginning_offsets,
    high_watermarks,
    offset_for_time,
    partitions_of,
    probe_consumer,
)
from pipeline.runtime.task import ReplayPlan, TaskContext, build_task
from pipeline.sdk.errors import ConfigError, LocalflowError
from pipeline.sdk.retry import Retry

log = logging.getLogger("localflow.replay")

ASSIGN_TIMEOUT = 60.0
"""Seconds to wait for the group to assign replay any partition before giving up."""
POLL = 0.2
"""Seconds between progress updates (also the resolution of the rates shown)."""
RETRY = Retry(initial_backoff=2.0, max_backoff=8.0, max_retries=2)
"""Runs of the task after a retriable error before it ends the replay (the runtime's one retry engine)."""


@dataclass
class PartitionPlan:
    """One partition to replay: from ``start`` up to ``end`` (the high watermark at start)."""

    collection: str
    tp: TopicPartition
    start: int
    end: int

    @property
    def label(self) -> str:
        return f"{self.collection}[{self.tp.partition}]"


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 / ISO 8601 time (UTC when it names no zone)."""
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not a time: write e.g. 2026-11-28T10:00:00Z or 2026-11-28",
                          "--from-timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def sources_of(catalog: Catalog, materialization: str, bindings: list[str] | None) -> list[str]:
    """The collections to replay: the named bindings' sources, or all of them."""
    spec = catalog.materializations.get(materialization)
    if spec is None:
        known = ", ".join(catalog.materializations) or "none"
        raise ConfigError(f"{materialization!r} is not a materialization of the catalog; materializations: {known}",
                          "--materialization")
    all_sources = [b.source for b in spec.bindings]
    if not bindings:
        return all_sources
    unknown = [b for b in bindings if b not in all_sources]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a binding of {materialization}; its bindings read "
                          f"{', '.join(all_sources)}", "--binding")
    return list(dict.fromkeys(bindings))


async def plan(catalog: Catalog, collections: list[str], from_timestamp_ms: int | None) -> list[PartitionPlan]:
    """Start and end of every partition of ``collections``; start by time when given."""
    async with probe_consumer(catalog.kafka) as consumer:
        by_tp: dict[TopicPartition, str] = {}
        for name in collections:
            topic = Collection.from_catalog(catalog, name).topic
            tps = await partitions_of(consumer, topic)
            if not tps:
                raise ConfigError(f"collection {name} has no topic {topic} on {catalog.kafka.bootstrap_servers} "
                                  f"(nothing was ever written to it)", "--binding")
            by_tp.update(dict.fromkeys(tps, name))
        ends = await high_watermarks(consumer, list(by_tp))
        begins = await beginning_offsets(consumer, by_tp)
        out = []
        for tp, name in by_tp.items():
            start = begins[tp]
            if from_timestamp_ms is not None:
                start = await offset_for_time(consumer, tp, from_timestamp_ms, begins[tp], ends[tp])
            out.append(PartitionPlan(name, tp, start, max(start, ends[tp])))
        return out


class _RateColumn(ProgressColumn):
    """Documents per second since the partition was assigned (rich's own speed needs many updates)."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        elapsed = task.elapsed
        rate = task.completed / max(elapsed, POLL) if elapsed is not None and task.completed else None
        return Text(f"{rate:,.0f} docs/s" if rate else "- docs/s", style="progress.data.speed")


@dataclass
class Outcome:
    plan: PartitionPlan
    reached: int
    assigned: bool

    @property
    def done(self) -> bool:
        return self.reached >= self.plan.end

    @property
    def documents(self) -> int:
        return max(0, self.reached - self.plan.start)


@dataclass
class Replayed:
    outcomes: list[Outcome]
    seconds: float
    joining: float
    """Seconds until the consumer group assigned the first partition."""

    @property
    def complete(self) -> bool:
        return all(o.done for o in self.outcomes)


async def run_replay(catalog: Catalog, materialization: str, plans: list[PartitionPlan], console: Console,
                     stopping: asyncio.Event | None = None) -> Replayed:
    """Run the materialization over ``plans`` with a progress bar per partition."""
    stopping = stopping or asyncio.Event()
    progress: dict[TopicPartition, int] = {}
    stop_at = {p.tp: p.end for p in plans}
    plan = ReplayPlan(start_offsets={p.tp: p.start for p in plans}, stop_at_end=stop_at, progress=progress)
    ctx = TaskContext(catalog, materialization, "materialization", stopping, replay=plan)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _interrupt, stopping, sig)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    ids = {p.tp: bars.add_task(p.label, total=max(1, p.end - p.start), completed=0, start=False) for p in plans}
    task = asyncio.create_task(_attempts(ctx, stopping), name=f"replay:{materialization}")
    began = time.monotonic()
    last_log, joined = began, None
    try:
        with bars:
            while not task.done():
                await asyncio.wait({task}, timeout=POLL)
                if progress and joined is None:
                    joined = time.monotonic()
                for p in plans:
                    if p.tp in progress:
                        bars.start_task(ids[p.tp])
                        total = max(1, stop_at[p.tp] - p.start)
                        bars.update(ids[p.tp], total=total, completed=min(total, max(0, progress[p.tp] - p.start)))
                if not progress and time.monotonic() - began > ASSIGN_TIMEOUT and not stopping.is_set():
                    log.error("the group localflow.%s assigned no partition to replay within %.0fs: its workers "
                              "hold them all; stop them and run replay again", materialization, ASSIGN_TIMEOUT)
                    stopping.set()
                if not console.is_terminal and time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    done = sum(max(0, progress.get(p.tp, p.start) - p.start) for p in plans)
                    log.info("replayed %d of %d documents", done, sum(p.end - p.start for p in plans))
        task.result()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not task.done():
            task.cancel()
        await ctx.aclose()
    for p in plans:
        p.end = stop_at[p.tp]
    ended = time.monotonic()
    return Replayed([Outcome(p, progress.get(p.tp, p.start), p.tp in progress) for p in plans],
                    ended - began, (joined or ended) - began)


async def _attempts(ctx: TaskContext, stopping: asyncio.Event) -> None:
    """Run the task again after a retriable error (a broker or endpoint slow for a moment); it goes
    on from where the endpoint's checkpoint got, so a retry re-applies at most one batch."""
    attempts = RETRY.attempts(ctx.sleep)
    while True:
        try:
            await build_task(ctx).run()
            return
        except LocalflowError as e:
            delay = attempts.delay() if e.retriable and not stopping.is_set() else None
            if delay is None:
                raise
            log.warning("replay into %s: run %d failed: %s; trying again in %.1fs", ctx.name, attempts.retries, e,
                        delay)
            if not await ctx.sleep(delay):
                raise


def _interrupt(stopping: asyncio.Event, sig: signal.Signals) -> None:
    if stopping.is_set():
        log.warning("received %s again: exiting at once", sig.name)
        sys.stderr.flush()
        os._exit(128 + sig)
    log.warning("received %s: stopping replay after the batch in flight (send it again to exit at once)", sig.name)
    stopping.set()


def summary(materialization: str, replayed: Replayed) -> Group:
    """The end-of-replay table: per partition what was replayed, and the totals."""
    table = Table(title=f"replay into {materialization}", title_justify="left")
    for column in ("partition", "from", "to", "documents", "status"):
        table.add_column(column, justify="right" if column in ("from", "to", "documents") else "left")
    for o in replayed.outcomes:
        if o.done:
            state = "done"
        elif not o.assigned:
            state = "not replayed: held by another worker of the group (stop it, then replay again)"
        else:
            state = f"stopped at {o.reached}: interrupted, or taken over by another worker (it resumes there)"
        table.add_row(o.plan.label, str(o.plan.start), str(o.plan.end), f"{o.documents:,}", state)
    total = sum(o.documents for o in replayed.outcomes)
    applying = replayed.seconds - replayed.joining
    rate = total / applying if applying > 0 else 0.0
    return Group(table, Text(f"{total:,} documents in {replayed.seconds:.1f}s: {replayed.joining:.1f}s joining "
                             f"the consumer group, then {rate:,.0f} docs/s"))
