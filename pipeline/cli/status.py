"""`localflow status`: what each task of a catalog is doing, from the broker and the workers.

Two sources, each for what it knows:
* the broker, for lag: per input partition, the fetch high watermark minus the task's
  checkpoint, which for derivations and materializations is the group ``localflow.<task>``'s
  committed offset (read per partition, without joining the group); capture checkpoints are
  the last record of ``localflow.checkpoints.<task>`` (their write time gives the checkpoint age);
* the workers, for the rest: each `localflow run --metrics-port P` serves ``/status``.
  ``--worker http://host:P`` (or LOCALFLOW_WORKERS) names them; without, they are found in
  the worker registry (``localflow.workers``, see ``pipeline.telemetry.server``), which lists every live
  worker of the cluster. A task no worker reports is shown as not running when some worker
  was asked, and as unknown when none was found.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import typer
from aiokafka.errors import KafkaError
from rich import box
from rich.console import Group
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from pipeline.cli.app import (
    CATALOG_ARG,
    OUTPUT,
    LogFormat,
    Output,
    app,
    console,
    load_or_exit,
    run_command,
    setup,
    workers_of,
)
from pipeline.cli.doctor import NO_BROKER_HINT
from pipeline.runtime.catalog import Catalog, topic_of
from pipeline.runtime.checkpoint import KafkaCheckpoints
from pipeline.runtime.collection import Collection
from pipeline.runtime.offsets import beginning_offsets, high_watermarks, partitions_of, probe_consumer
from pipeline.runtime.task import kind_of
from pipeline.sdk.errors import CheckpointError, EndpointError
from pipeline.telemetry.logs import describe, no_broker, redact
from pipeline.telemetry.server import HEARTBEAT_S, REGISTRY_TOPIC

REGISTRY_TAIL = 1000
"""Registry records read back from its end: at one per worker per HEARTBEAT_S, minutes of history."""


@dataclass
class PartitionLag:
    collection: str
    partition: int
    end: int
    checkpoint: int | None
    worker: str | None = None
    """The worker whose consumer holds the partition now (from the workers' /status), if any said so."""

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.checkpoint or 0))


@dataclass
class TaskReport:
    name: str
    kind: str
    workers: int = 0
    """Workers reporting this task as running."""
    running: bool | None = None
    """None: unknown (no worker was asked)."""
    docs_per_second: float | None = None
    checkpoint_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failed: str | None = None
    """Why a worker stopped the task FAILED (it is not restarted until an operator acts)."""
    partitions: list[PartitionLag] = field(default_factory=list)
    missing_topics: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    """Collections a capture writes."""
    leases: list[dict[str, Any]] = field(default_factory=list)
    """In a cluster, the workers holding this capture's lease (``worker``, ``url``, ``epoch``): one, or none
    during a rebalance; two would be a bug."""


@dataclass
class StatusReport:
    tasks: list[TaskReport]
    problems: list[str]
    at: float
    workers: list[str] = field(default_factory=list)
    """The workers asked for their /status."""
    discovered: bool = False
    """Whether they came from the registry (no --worker given)."""
    kafka_down: bool = False
    clusters: dict[str, list[str]] = field(default_factory=dict)
    """Cluster name -> the workers (ids) of it that answered."""

    def as_json(self) -> dict[str, Any]:
        """``--output json``: the same facts as the text, in numbers (epoch seconds, documents)."""
        return {"at": self.at, "workers": self.workers, "discovered": self.discovered, "clusters": self.clusters,
                "problems": [redact(p) for p in self.problems],
                "tasks": [{"name": t.name, "kind": t.kind, "running": t.running, "workers": t.workers, "leases": t.leases,
                           "failed": redact(t.failed) if t.failed else None,
                           "docs_per_second": t.docs_per_second, "checkpoint_at": t.checkpoint_at,
                           "last_error": redact(t.last_error) if t.last_error else None,
                           "last_error_at": t.last_error_at, "targets": t.targets,
                           "lag": sum(p.lag for p in t.partitions) if t.partitions else None,
                           "partitions": [{"collection": p.collection, "partition": p.partition, "end": p.end,
                                           "checkpoint": p.checkpoint, "lag": p.lag, "worker": p.worker}
                                          for p in t.partitions],
                           "missing_topics": t.missing_topics} for t in self.tasks]}


async def discover(catalog: Catalog, now: float | None = None) -> list[str]:
    """The /status URLs of the catalog's live workers, from the tail of the worker registry.

    A worker is live when its last record is recent (within three heartbeats) and does not say
    it stopped, and it runs a task of this catalog.
    """
    now = time.time() if now is None else now
    latest: dict[bytes, dict[str, Any]] = {}
    async with probe_consumer(catalog.kafka, partition_fetch_bytes=1024 * 1024) as consumer:
        tps = await partitions_of(consumer, REGISTRY_TOPIC)
        if not tps:
            return []
        ends = await high_watermarks(consumer, tps)
        begins = await beginning_offsets(consumer, tps)
        for tp in tps:
            consumer.seek(tp, max(begins[tp], ends[tp] - REGISTRY_TAIL))
        pending = {tp for tp in tps if ends[tp] > begins[tp]}
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for tp, messages in (await consumer.getmany(*pending, timeout_ms=200)).items():
                for m in messages:
                    if m.offset < ends[tp] and m.key:
                        with contextlib.suppress(orjson.JSONDecodeError):
                            latest[m.key] = orjson.loads(m.value or b"null")
            pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    tasks = set(catalog.task_names())
    return sorted({w["url"] for w in latest.values()
                   if isinstance(w, dict) and not w.get("stopped") and isinstance(w.get("url"), str)
                   and now - float(w.get("heartbeat_at") or 0) <= 3 * HEARTBEAT_S
                   and tasks & set(w.get("tasks") or ())})


async def worker_status(urls: list[str], timeout: float = 3.0) -> tuple[list[dict[str, Any]], list[str]]:  # noqa: ASYNC109
    """The ``/status`` of each worker that answered, and a line for each that did not."""
    answers, problems = [], []
    async with httpx.AsyncClient(timeout=timeout) as client:
        async def one(url: str) -> None:
            try:
                response = await client.get(url.rstrip("/") + "/status")
                response.raise_for_status()
                answers.append(response.json())
            except (httpx.HTTPError, ValueError) as e:
                problems.append(f"worker {url} did not answer /status: {describe(e)}")

        await asyncio.gather(*(one(u) for u in urls))
    return answers, problems


def inputs_of(catalog: Catalog, task: str) -> list[str]:
    """The collections a derivation or materialization reads (captures read none)."""
    if task in catalog.materializations:
        return [b.source for b in catalog.materializations[task].bindings]
    derive = catalog.collections[task].derive if task in catalog.collections else None
    return list(dict.fromkeys(t.source for t in derive.transforms)) if derive else []


async def gather(catalog: Catalog, workers: list[str] | None) -> StatusReport:
    """One report per task of the catalog; ``workers`` None: those of the registry."""
    problems: list[str] = []
    discovered = workers is None
    kafka_down = False
    if workers is None:
        try:
            workers = await discover(catalog)
        except (EndpointError, KafkaError) as e:
            problems.append(f"cannot read the worker registry: {describe(e)}")
            kafka_down = no_broker(e) is not None
            workers = []
    answers, unanswered = await worker_status(workers) if workers else ([], [])
    problems += unanswered
    reports = {name: TaskReport(name, kind_of(catalog, name)) for name in catalog.task_names()}
    for name, capture in catalog.captures.items():
        reports[name].targets = [b.target for b in capture.bindings]
    for report in reports.values():
        if workers:
            report.running = False
    for answer in answers:
        for name, t in answer.get("tasks", {}).items():
            report = reports.get(name)
            if report is None:
                continue
            if t.get("failed"):
                report.failed = t["failed"]
            if t.get("running"):
                report.running = True
                report.workers += 1
                report.docs_per_second = (report.docs_per_second or 0.0) + float(t.get("docs_per_second") or 0)
            report.checkpoint_at = _latest(report.checkpoint_at, t.get("checkpoint_at"))
            if t.get("last_error") and (t.get("last_error_at") or 0) >= (report.last_error_at or 0):
                report.last_error, report.last_error_at = t["last_error"], t.get("last_error_at")
    if not kafka_down:
        try:
            await _lags(catalog, reports)
            await _capture_checkpoints(catalog, reports)
        except (EndpointError, KafkaError) as e:
            problems.append(f"lag unknown: {describe(e)}")
            kafka_down = no_broker(e) is not None
    clusters = cluster_view(answers, reports)
    return StatusReport(list(reports.values()), problems, time.time(), workers, discovered, kafka_down, clusters)


def cluster_view(answers: list[dict[str, Any]], reports: dict[str, TaskReport]) -> dict[str, list[str]]:
    """From the workers' /status: fill each capture's lease holders and each input partition's worker
    (after the partitions were read); return the workers of each cluster."""
    holders: dict[tuple[str, str, int], str] = {}
    clusters: dict[str, list[str]] = {}
    for answer in answers:
        worker = str(answer.get("worker") or answer.get("host") or "?")
        cluster = answer.get("cluster") or {}
        if cluster.get("name"):
            clusters.setdefault(str(cluster["name"]), []).append(worker)
        for name, lease in (cluster.get("leases") or {}).items():
            if name in reports:
                reports[name].leases.append({"worker": worker, "url": answer.get("url"), "epoch": lease.get("epoch"),
                                             "partition": lease.get("partition")})
        for name, t in (answer.get("tasks") or {}).items():
            for topic, partition in t.get("partitions") or ():
                holders[(name, str(topic), int(partition))] = worker
    for report in reports.values():
        for p in report.partitions:
            p.worker = holders.get((report.name, topic_of(p.collection), p.partition))
    return clusters


async def with_cluster(catalog: Catalog, reports: list[TaskReport]) -> None:
    """Fill lease holders and partition workers into reports gathered without asking the workers
    (the API's /v1/tasks), from the registry's live workers; best effort."""
    try:
        urls = await discover(catalog)
    except (EndpointError, KafkaError):
        return
    answers, _ = await worker_status(urls) if urls else ([], [])
    cluster_view(answers, {r.name: r for r in reports})


async def _lags(catalog: Catalog, reports: dict[str, TaskReport]) -> None:
    topics = {Collection.from_catalog(catalog, name).topic
              for report in reports.values() for name in inputs_of(catalog, report.name)}
    if not topics:
        return
    async with probe_consumer(catalog.kafka) as consumer:
        tps_of = {topic: await partitions_of(consumer, topic) for topic in topics}
        ends = await high_watermarks(consumer, [tp for tps in tps_of.values() for tp in tps])
    for report in reports.values():
        inputs = inputs_of(catalog, report.name)
        if not inputs:
            continue
        async with probe_consumer(catalog.kafka, group_id=f"localflow.{report.name}") as group:
            for name in inputs:
                topic = Collection.from_catalog(catalog, name).topic
                if not tps_of[topic]:
                    report.missing_topics.append(topic)
                for tp in tps_of[topic]:
                    committed = await group.committed(tp)
                    report.partitions.append(PartitionLag(name, tp.partition, ends[tp], committed))


async def _capture_checkpoints(catalog: Catalog, reports: dict[str, TaskReport]) -> None:
    store = KafkaCheckpoints(catalog.kafka)
    for task, report in reports.items():
        if report.kind != "capture":
            continue
        try:
            checkpoint = await store.latest(task)
        except CheckpointError:
            continue
        if checkpoint is not None:
            report.checkpoint_at = _latest(report.checkpoint_at, checkpoint.written_at_epoch)


def _latest(a: float | None, b: Any) -> float | None:
    if b is None:
        return a
    return max(a or 0.0, float(b))


def ago(at: float | None, now: float) -> str:
    """``3s ago``, ``4m ago``, ``2h ago``, ``5d ago``; ``never`` for None."""
    if at is None:
        return "never"
    s = max(0.0, now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def render(report: StatusReport) -> Group:
    """Per task a heading line (running, docs/s, checkpoint age), its partitions' lag, its last error."""
    parts: list[Any] = [f"[yellow]![/] {escape(redact(p))}" for p in report.problems]
    if report.kafka_down:
        parts.append(NO_BROKER_HINT)
    elif report.discovered:
        parts.append(f"{len(report.workers)} worker(s) in {REGISTRY_TOPIC}" if report.workers else
                     f"no live worker in {REGISTRY_TOPIC} (workers register when run with --metrics-port)")
    for name, members in sorted(report.clusters.items()):
        parts.append(f"cluster {escape(name)}: {len(members)} worker(s): {escape(', '.join(sorted(members)))}")
    for t in report.tasks:
        if t.running is None:
            running = "running: unknown"
        elif t.running:
            running = f"[green]running[/] on {t.workers} worker{'s' if t.workers != 1 else ''}"
        elif t.failed:
            running = "[bold red]FAILED[/] (not restarted: fix the cause, then `localflow run --restart-failed` or restart it)"
        else:
            running = "[red]not running[/]"
        rate = f"{t.docs_per_second:,.1f} docs/s" if t.docs_per_second is not None else "- docs/s"
        unknown = t.checkpoint_at is None and t.running is None and t.kind != "capture"
        checkpoint = "age unknown" if unknown else ago(t.checkpoint_at, report.at)
        parts.append(f"\n[bold]{t.name}[/] ({t.kind}) · {running} · {rate} · checkpoint {checkpoint}")
        if t.kind == "capture":
            parts.append(f"  writes to {', '.join(t.targets)}")
            for lease in t.leases:
                parts.append(f"  lease held by {escape(str(lease['worker']))} (epoch {lease['epoch']})")
            if report.clusters and not t.leases:
                parts.append("  lease held by no worker (a rebalance is under way, or no worker of the cluster answered)")
        elif not t.partitions and not t.missing_topics:
            parts.append("  lag unknown")
        else:
            table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
            columns = ["collection", "partition", "end", "checkpoint", "lag (docs)"] + (["worker"] if report.clusters else [])
            for column in columns:
                table.add_column(column, justify="left" if column in ("collection", "worker") else "right")
            for p in t.partitions:
                table.add_row(p.collection, str(p.partition), str(p.end),
                              "none" if p.checkpoint is None else str(p.checkpoint), f"{p.lag:,}",
                              *([p.worker or "-"] if report.clusters else []))
            for topic in t.missing_topics:
                table.add_row(topic, "-", "-", "-", "no topic yet", *(["-"] if report.clusters else []))
            parts.append(Padding(table, (0, 0, 0, 2), expand=False))
        if t.failed and not t.running:
            parts.append(f"  [red]failed:[/] {escape(redact(t.failed))}")
        else:
            parts.append(f"  last error {ago(t.last_error_at, report.at)}: {escape(redact(t.last_error))}"
                         if t.last_error else "  no error")
    return Group(*parts)


# ---------------------------------------------------------------------------- the command

@app.command()
def status(
    catalog: Path = CATALOG_ARG,
    worker: list[str] | None = typer.Option(
        None, "--worker", "-w",
        help="URL of a worker's metrics port (repeatable); default: LOCALFLOW_WORKERS (comma-separated), "
             "else every live worker of the registry in Kafka."),
    watch: bool = typer.Option(False, "--watch", help="Refresh in place until Ctrl-C."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    output: Output = OUTPUT,
) -> None:
    """Show each task: running or not, documents per second, lag per partition, checkpoint age, last error.

    Lag (partition end minus the task's committed checkpoint, in documents) comes from the
    broker; running, documents per second and errors from the workers' /status (`localflow
    run --metrics-port`). Workers register themselves in Kafka (topic localflow.workers), so
    status finds every live worker of the cluster; --worker or LOCALFLOW_WORKERS name them
    instead. Exit 1 when the broker or a worker did not answer (what could be read is still
    shown).

    \b
    Example:
      localflow status examples/sophia/flow.yaml --watch
      localflow status examples/sophia/flow.yaml --output json
    """
    from pipeline.cli import status as st

    setup(LogFormat.text, "warning", quiet_clients=True)
    cat = load_or_exit(catalog)
    urls = workers_of(worker)

    def show(report: st.StatusReport) -> None:
        if output == Output.json:
            print(orjson.dumps(report.as_json()).decode(), flush=True)
        else:
            console.print(st.render(report))

    async def once() -> int:
        report = await st.gather(cat, urls)
        show(report)
        return 1 if report.problems else 0

    async def live() -> int:
        from rich.live import Live

        # Ctrl-C ends the watch at once: a read-only view has nothing to flush, and the cleanup of a
        # refresh's Kafka clients, cancelled midway, may otherwise wait out a loaded broker's timeouts.
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, _interrupted)
        if output == Output.json or not console.is_terminal:  # a pipe or a file: one snapshot after the other
            while True:
                show(await st.gather(cat, urls))
                await asyncio.sleep(interval)
        with Live(console=console, auto_refresh=False, screen=False) as view:
            while True:
                view.update(st.render(await st.gather(cat, urls)), refresh=True)
                await asyncio.sleep(interval)

    try:
        raise typer.Exit(run_command(live if watch else once))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _interrupted() -> None:
    """`status --watch` after Ctrl-C: the cursor back, what was printed flushed, exit 0 now."""
    console.show_cursor(True)
    console.file.flush()
    sys.stdout.flush()
    os._exit(0)
