"""The worker's HTTP endpoint (``localflow run --metrics-port``): metrics, health, readiness, status.

* ``/metrics``: every metric of ``pipeline.telemetry.metrics``, negotiated as prometheus_client's own
  handlers do: OpenMetrics when the ``Accept`` header asks for it (as Prometheus does), else
  the text format; gzip when accepted; ``?name[]=...`` for only some metrics.
* ``/healthz``: 200 while the process is alive and its event loop answers.
* ``/readyz``: 200 when every task of this process is running, connected to its endpoints and
  not stalled (it has a backlog but made no progress for ``stall_after`` seconds); else 503.
  The body says, per task, ``ok`` or why not.
* ``/status``: JSON for `localflow status`: per task running, connected, documents per second,
  restarts, last error (redacted), last progress and checkpoint times.

Given the catalog's Kafka, the worker also keeps itself in the worker registry, the topic
``localflow.workers``: a record (keyed by worker id) with its ``/status`` URL and tasks every
``HEARTBEAT_S``, and a last one saying it stopped. `localflow status` reads the registry's tail
to find every live worker of the catalog, as Kafka Connect's REST answers for the whole
cluster. The registry is best effort: a broker that does not answer never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import os
import socket
import time
from collections import deque
from typing import Any

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder, gzip_accepted

from pipeline.runtime.catalog import KafkaConfig
from pipeline.runtime.collection import CollectionWriter
from pipeline.runtime.task import STATUS, TaskKind
from pipeline.sdk.errors import LocalflowError
from pipeline.telemetry import metrics
from pipeline.telemetry.logs import describe, redact

RATE_WINDOW = 10.0
"""Seconds over which documents per second are averaged."""
REGISTRY_TOPIC = "localflow.workers"
HEARTBEAT_S = 10.0
"""How often a worker renews its registry record; `status` counts it gone after ``3 *`` that."""
ADVERTISED_HOST_ENV = "LOCALFLOW_ADVERTISED_HOST"
"""The host other machines reach this worker's port at (default: the bind address, or the
host name when it binds every address)."""

log = logging.getLogger("localflow.server")


class Telemetry:
    """The HTTP server of one worker process; ``tasks`` are the task names it runs."""

    def __init__(self, tasks: dict[str, TaskKind], *, stall_after: float = 300.0,
                 kafka: KafkaConfig | None = None) -> None:
        self.tasks = tasks
        self.kafka = kafka
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{int(time.time() * 1000)}"
        self._registry: asyncio.Task[None] | None = None
        self.cluster: Any = None
        """In cluster mode (``pipeline.runtime.cluster.Cluster``): its leases go in /status and the registry."""
        self._renew = asyncio.Event()
        self.stall_after = stall_after
        self.started_at = time.time()
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.host = ""
        self.port = 0
        for name, kind in tasks.items():  # series exist (at 0) before the first event
            metrics.TASK_RESTARTS.labels(name)
            metrics.TASK_UP.labels(name)
            metrics.TASK_FAILED.labels(name)
            metrics.TASK_INFO.labels(name, kind)
            for error_kind in ("auth", "source", "endpoint", "config", "fenced", "internal"):
                metrics.ERRORS.labels(name, error_kind)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free port, see ``self.port``)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # noqa: SLF001 - the bound port when 0 was asked
        sockets = getattr(server, "sockets", None) or []
        self.host, self.port = host, sockets[0].getsockname()[1] if sockets else port
        self._sampler = asyncio.create_task(self._sample(), name="localflow-telemetry-sampler")
        if self.kafka is not None:
            self._registry = asyncio.create_task(self._register(self.kafka), name="localflow-worker-registry")

    @property
    def advertised_url(self) -> str:
        host = os.environ.get(ADVERTISED_HOST_ENV) or (
            socket.gethostname() if self.host in ("", "0.0.0.0", "::") else self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def registration(self, *, stopped: bool = False) -> dict[str, Any]:
        """The registry record of this worker."""
        return {"version": 1, "worker": self.worker_id, "url": self.advertised_url, "pid": os.getpid(),
                "host": socket.gethostname(), "tasks": dict(self.tasks), "started_at": self.started_at,
                "heartbeat_at": time.time(), "stopped": stopped, "cluster": self.cluster_view(stopped=stopped)}

    def cluster_view(self, *, stopped: bool = False) -> dict[str, Any] | None:
        """The cluster this worker belongs to, the capture leases and input partitions it holds."""
        if self.cluster is None:
            return None
        view = self.cluster.view()
        if stopped:
            view["leases"] = {}
        view["partitions"] = {name: [list(tp) for tp in s.partitions] for name, s in STATUS.items()
                              if name in self.tasks and s.partitions and not stopped}
        return view

    def renew(self) -> None:
        """Renew the registry record now (the leases changed), not at the next heartbeat."""
        self._renew.set()

    async def _register(self, kafka: KafkaConfig) -> None:
        """Renew this worker's registry record until stopped; then say it stopped."""
        writer: CollectionWriter | None = None
        failing = False
        try:
            while True:
                try:
                    if writer is None:
                        fresh = CollectionWriter(kafka, "localflow-registry")
                        await fresh.start()  # a start that fails leaves no client behind
                        writer = fresh
                    await writer.admin.ensure({REGISTRY_TOPIC: (1, 1, {"cleanup.policy": "compact"})})
                    await self._announce(writer)
                    if failing:
                        log.info("worker registry %s: registered again", REGISTRY_TOPIC)
                    failing = False
                except (LocalflowError, KafkaError) as e:
                    if not failing:
                        log.warning("worker registry %s: cannot register this worker (localflow status will "
                                    "not find it until it can): %s", REGISTRY_TOPIC, describe(e))
                    failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._renew.wait(), timeout=HEARTBEAT_S)  # the heartbeat, or a change
                self._renew.clear()
        except asyncio.CancelledError:
            with contextlib.suppress(LocalflowError, KafkaError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._announce(writer, stopped=True)
            raise
        finally:
            if writer is not None:
                await writer.stop()

    async def _announce(self, writer: CollectionWriter | None, *, stopped: bool = False) -> None:
        if writer is not None:
            await (await writer.producer.send(REGISTRY_TOPIC, orjson.dumps(self.registration(stopped=stopped)),
                                              key=self.worker_id.encode()))

    async def stop(self) -> None:
        if self._registry is not None:
            self._registry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._registry
            self._registry = None
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _sample(self) -> None:
        while True:
            now = time.monotonic()
            self._samples.append((now, {n: s.documents for n, s in STATUS.items()}))
            while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
                self._samples.popleft()
            await asyncio.sleep(1.0)

    def rate(self, task: str) -> float:
        """Documents per second of ``task`` over about the last ``RATE_WINDOW`` seconds."""
        status = STATUS.get(task)
        if status is None or not self._samples:
            return 0.0
        at, counts = self._samples[0]
        elapsed = time.monotonic() - at
        return (status.documents - counts.get(task, 0)) / elapsed if elapsed > 0.5 else 0.0

    def readiness(self) -> dict[str, str]:
        """``ok`` or the reason, per task of this process."""
        lagging = _tasks_with_lag()
        now = time.time()
        out = {}
        for name in self.tasks:
            s = STATUS.get(name)
            if s is not None and s.failed:
                reason = f"FAILED: {redact(s.failed)}"
            elif s is None or not s.running:
                reason = "not running" + (f" (last error: {redact(s.last_error)})" if s and s.last_error else "")
            elif not s.connected:
                reason = "starting: not connected to its endpoints yet"
            elif name in lagging and now - (s.last_progress_at or self.started_at) > self.stall_after:
                reason = f"stalled: has a backlog but made no progress for {self.stall_after:g}s"
            else:
                reason = "ok"
            out[name] = reason
        return out

    def status(self) -> dict[str, Any]:
        checkpoints = metrics.checkpoint_times()
        tasks = {}
        for name, kind in self.tasks.items():
            s = STATUS.get(name)
            tasks[name] = {
                "kind": kind,
                "state": "FAILED" if s and s.failed else "RUNNING" if s and s.running else "STOPPED",
                "failed": redact(s.failed) if s and s.failed else None,
                "running": bool(s and s.running),
                "connected": bool(s and s.connected),
                "documents": s.documents if s else 0,
                "docs_per_second": round(self.rate(name), 3),
                "restarts": s.restarts if s else 0,
                "last_error": redact(s.last_error) if s and s.last_error else None,
                "last_error_at": s.last_error_at if s else None,
                "last_progress_at": s.last_progress_at if s else None,
                "checkpoint_at": checkpoints.get(name),
                "partitions": [list(tp) for tp in s.partitions] if s else [],
            }
        return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": self.started_at,
                "now": time.time(), "worker": self.worker_id, "url": self.advertised_url,
                "cluster": self.cluster_view(), "tasks": tasks}

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        tasks = self.readiness()
        ready = all(r == "ok" for r in tasks.values())
        return web.json_response({"ready": ready, "tasks": tasks}, status=200 if ready else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())


def metrics_response(request: web.Request) -> web.Response:
    """The registry's metrics for ``request``, as prometheus_client's ``MetricsHandler`` answers."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    names = request.query.getall("name[]", [])
    body = encoder(REGISTRY.restricted_registry(names) if names else REGISTRY)
    headers = {"Content-Type": content_type}
    if gzip_accepted(request.headers.get("Accept-Encoding", "")):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def _tasks_with_lag() -> set[str]:
    """Tasks with a positive consumer lag on some partition (from the lag gauge)."""
    out = set()
    for family in metrics.CONSUMER_LAG.collect():
        for sample in family.samples:
            if sample.value > 0:
                out.add(sample.labels["task"])
    return out
