"""The whole Sophia pipeline on private servers, for fault injection: sources, workers, counts.

Why: localflow's promises (SPEC "Guarantees") are about the pipeline as users run it, one
process per task, so that is what the reliability tests run:

* ``SourceServer``: a real HTTP server (its own thread and event loop) that plays the Sophia
  API (`/v1/records`, bearer token, next-link pages, `since` cursor) and an app's `/metrics`,
  and can misbehave on demand: hang, reset connections, answer slowly. Extra paths serve the
  bad-input corpus. ``AgentLogs`` appends numbered lines to log files.
* ``FaultProxy``: a TCP proxy in front of a server that can go down (connections refused, open
  ones reset) and come back, for a server whose restart would lose its data (moto keeps S3 in
  memory; real S3 does not forget).
* ``Pipeline``: a catalog derived from `examples/sophia/flow.yaml` (same collections, SQL and
  bindings; short intervals; sources and servers from the environment) and one
  `python -m pipeline run CATALOG --task NAME` process per task, which a test may kill -9,
  SIGTERM and restart. Each incarnation logs to its own file.
* ``Census``: what every stage holds, counted independently of the code under test: topics
  and dead-letter topics (read to their high watermark), Postgres rows, Redis keys, S3 objects
  (decompressed; each line's Kafka offset from the object's name and `gaps` metadata).
* ``judge``: compares a census with what the sources produced: nothing lost, nothing doubled,
  and captured = materialized + dead letters at every endpoint. ``FaultTable`` prints the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aioboto3
import asyncpg
import orjson
import yaml
import zstandard
from aiohttp import web
from redis.asyncio import Redis

from pipeline.embedded.services import HOST, Services, free_port
from pipeline.runtime.catalog import KafkaConfig
from pipeline.runtime.collection import read_to_end
from pipeline.sdk.errors import EndpointError
from pipeline.sdk.records import Record

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sophia" / "flow.yaml"

API_TASK, LOGS_TASK, METRICS_TASK = "sophia/sophia_ai_data", "sophia/agent_logs", "sophia/metrics"
DERIVATION = "sophia/sophia_processed_data"
POSTGRES, REDIS, S3 = "sophia/postgres", "sophia/redis", "sophia/s3-archive"
TASKS = (API_TASK, LOGS_TASK, METRICS_TASK, DERIVATION, POSTGRES, REDIS, S3)
CAPTURES = (API_TASK, LOGS_TASK, METRICS_TASK)
CONSUMERS = (DERIVATION, POSTGRES, REDIS, S3)

RAW, PROCESSED = "sophia/sophia_raw_data", "sophia/sophia_processed_data"
AGENT_LOGS, METRICS = "sophia/sophia_agent_logs", "sophia/sophia_metrics"
COLLECTIONS = (RAW, PROCESSED, AGENT_LOGS, METRICS)

PG_SCHEMA = "estuary"
PG_TABLES = {PROCESSED: ("sophia_processed_data", "id"), AGENT_LOGS: ("sophia_agent_logs", "metadata/id"),
             METRICS: ("sophia_metrics", "metadata/id")}
"""Postgres bindings of the Sophia catalog: collection -> (table, key column)."""
REDIS_PREFIXES = {PROCESSED: "sophia:processed:", RAW: "sophia:raw:", AGENT_LOGS: "sophia:agent_logs:",
                  METRICS: "sophia:metrics:"}
REDIS_STREAM = "sophia:processed:stream"
S3_BUCKET, S3_PREFIX = "sophia-intel-data", "estuary/"

API_PATH = "/v1/records"
INSTANCE_HEADER = "X-Localflow-Instance"
"""Sent by the API capture with the worker's LOCALFLOW_TEST_INSTANCE (default "first"): who polled."""
METRICS_PATH = "/metrics"
PAGE_SIZE = 20


def topic(collection: str) -> str:
    return collection.replace("/", ".")


# ============================================================================ sources


class SourceLoop:
    """An event loop in a daemon thread: the sources keep answering while tests block or wait."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-sources", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the source loop and wait for its result (from a thread that is not it)."""
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _rfc3339(micros: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def abort_connection(request: web.Request) -> None:
    """Reset the request's TCP connection (RST, not FIN): what a crashed or cut-off server does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class RecordsApi:
    """The Sophia API's records: appended over time, served in pages after an index or a time.

    Timestamps strictly increase, so `since` never misses a record added later. Only the source
    loop touches it (``SourceServer.add_records`` hops there).
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.records: list[dict[str, Any]] = []
        self._last_micros = 0

    def add(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            now = int(time.time() * 1_000_000)
            self._last_micros = max(now, self._last_micros + 1)
            record = {"timestamp": _rfc3339(self._last_micros), **r}
            self.records.append(record)
            out.append(record)
        return out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token != self.token:
            return web.json_response({"error": "unauthorized"}, status=401)
        start = 0
        if "after" in request.query:
            start = int(request.query["after"]) + 1
        elif "since" in request.query:
            since = request.query["since"]
            start = next((i for i, r in enumerate(self.records) if str(r.get("timestamp", "")) > since),
                         len(self.records))
        page = self.records[start:start + PAGE_SIZE]
        more = start + len(page) < len(self.records)
        nxt = str(request.url.with_query({"after": str(start + len(page) - 1)})) if more and page else None
        return web.Response(body=orjson.dumps({"records": page, "next": nxt}), content_type="application/json")


class MetricsBody:
    """An app's /metrics: a few series that move on every scrape, NaN and ±Inf included."""

    def __init__(self) -> None:
        self.scrapes = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        n = self.scrapes
        text = (
            "# HELP sophia_queue_depth Messages waiting.\n# TYPE sophia_queue_depth gauge\n"
            f'sophia_queue_depth{{queue="agents"}} {n % 17}\n'
            f'sophia_queue_depth{{queue="ingest"}} {n % 5}\n'
            "# TYPE sophia_requests_total counter\n"
            f'sophia_requests_total{{path="/v1/records"}} {n * 3}\n'
            "# TYPE sophia_cache_ratio gauge\nsophia_cache_ratio NaN\n"
            "# TYPE sophia_limit gauge\nsophia_limit{edge=\"upper\"} +Inf\nsophia_limit{edge=\"lower\"} -Inf\n"
        )
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SourceServer:
    """One HTTP server for the API, /metrics and any path a test registers in ``routes``.

    ``set_fault`` makes every route misbehave: ``hang`` (accept, never answer until the fault is
    cleared), ``reset`` (two requests out of three get a TCP reset), ``slow`` (the body trickles
    in over ``slow_seconds``); '' clears it.
    """

    def __init__(self, token: str) -> None:
        self.loop = SourceLoop()
        self.api = RecordsApi(token)
        self.metrics = MetricsBody()
        self.routes: dict[str, Handler] = {API_PATH: self.api.handle, METRICS_PATH: self.metrics.handle}
        self.port = 0
        self.fault = ""
        self.slow_seconds = 1.5
        self.requests: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()
        self.pollers: list[str] = []
        """The INSTANCE_HEADER of each API request, in order: which worker process polled."""
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        self.loop.call(self._start())

    async def _start(self) -> None:
        self._release = asyncio.Event()
        self._release.set()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        assert self._release is not None
        self.requests[request.path] += 1
        if request.path == API_PATH:
            self.pollers.append(request.headers.get(INSTANCE_HEADER, "?"))
        fault = self.fault
        if fault == "reset" and sum(self.requests.values()) % 3:
            self.faulted["reset"] += 1
            abort_connection(request)
            return web.Response()
        if fault == "hang":
            self.faulted["hang"] += 1
            await self._release.wait()
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text=f"no route {request.path}")
        response = await handler(request)
        if fault != "slow" or not isinstance(response, web.Response) or not response.body:
            return response
        self.faulted["slow"] += 1
        body = bytes(response.body)
        slow = web.StreamResponse(status=response.status,
                                  headers={"Content-Type": response.headers.get("Content-Type", "")})
        slow.content_length = len(body)
        await slow.prepare(request)
        pieces = 5
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            await asyncio.sleep(self.slow_seconds / pieces)  # the trickle is the fault itself
            await slow.write(body[i:i + step])
        await slow.write_eof()
        return slow

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def add_records(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append records to the API (from any thread but the source loop's)."""
        async def add() -> list[dict[str, Any]]:
            return self.api.add(records)

        return self.loop.call(add())

    def set_fault(self, fault: str) -> None:
        async def apply() -> None:
            assert self._release is not None
            self.fault = fault
            if fault == "hang":
                self._release.clear()
            else:
                self._release.set()

        self.loop.call(apply())

    def close(self) -> None:
        self.set_fault("")
        if self._runner is not None:
            self.loop.call(self._runner.cleanup())
        self.loop.close()


class AgentLogs:
    """Numbered lines appended to agent log files: JSON lines and plain text, one write per line."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.seq = 0
        self.written: set[int] = set()
        self.too_long: list[int] = []
        """Sequence numbers of lines longer than the capture's max_line_bytes (dead letters)."""
        self.refused: set[int] = set()
        """Sequence numbers of lines Postgres refuses (a NUL character: jsonb cannot hold it)."""
        self._lock = threading.Lock()

    def write(self, count: int, *, too_long: int = 0, nul: int = 0) -> list[int]:
        """Append ``count`` good lines, then ``too_long`` over-long and ``nul`` NUL-carrying ones."""
        with self._lock:
            out = []
            for i in range(count + too_long + nul):
                self.seq += 1
                n = self.seq
                if i >= count + too_long:
                    self._append("agent-json.jsonl", orjson.dumps({"seq": n, "message": "nul\u0000byte"}))
                    self.refused.add(n)
                elif i >= count:
                    self._append("agent-text.log", f"seq={n} ERROR ".encode() + b"x" * (300 * 1024))
                    self.too_long.append(n)
                    continue  # never becomes a document
                elif n % 2:
                    self._append("agent-json.jsonl", orjson.dumps({"seq": n, "level": "info", "agent": "ops-agent",
                                                                   "message": f"step {n} done"}))
                else:
                    self._append("agent-text.log", f"seq={n} INFO [research-agent] step {n} done".encode())
                self.written.add(n)
                out.append(n)
            return out

    def _append(self, name: str, line: bytes) -> None:
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line + b"\n")
        finally:
            os.close(fd)


def log_seq(doc: dict[str, Any]) -> int | None:
    """The sequence number of an `AgentLogs` line from its captured document."""
    data = doc.get("data") or {}
    if isinstance(data.get("seq"), int):
        return data["seq"]
    m = re.match(r"seq=(\d+) ", str(data.get("message", "")))
    return int(m.group(1)) if m else None


class FaultProxy:
    """A TCP proxy to ``target`` that can go down (listener closed, open connections reset) and up."""

    def __init__(self, loop: SourceLoop, target_host: str, target_port: int) -> None:
        self.loop = loop
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.up()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def up(self) -> None:
        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, HOST, self.port, reuse_address=True)

        self.loop.call(start())

    def down(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._open):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            self._open.clear()

        self.loop.call(stop())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._open -= {writer, up_writer}


# ============================================================================ the pipeline


def sophia_catalog(path: Path, *, s3_max_age: str = "2s", metrics_interval: str = "2s",
                   edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Write a catalog derived from examples/sophia/flow.yaml: the same collections, enrichment SQL
    and bindings, with short intervals for tests, schemas by absolute path, and no catalog tests.

    Sources and servers come from the environment, as in the example (SOPHIA_API_URL,
    SOPHIA_API_TOKEN, SOPHIA_AGENT_LOG_DIR, SOPHIA_METRICS_URL, POSTGRES_URL, REDIS_URL,
    S3_ENDPOINT_URL, ...). ``edit`` may change the loaded document before it is written.
    """
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc.pop("tests", None)
    for spec in doc["collections"].values():
        spec["schema"] = str((EXAMPLE.parent / spec["schema"]).resolve())
    captures = doc["captures"]
    api = captures[API_TASK]
    api["interval"] = "1s"
    api["endpoint"]["http"]["headers"] = {INSTANCE_HEADER: "${LOCALFLOW_TEST_INSTANCE:-first}"}
    api["endpoint"]["http"].update(timeout="3s", advanced={"retry": {"initial_backoff": "200ms", "max_backoff": "1s",
                                                                     "max_retries": 3}})
    captures[LOGS_TASK]["interval"] = "1s"
    captures[METRICS_TASK]["interval"] = metrics_interval
    captures[METRICS_TASK]["endpoint"]["prometheus"]["timeout"] = metrics_interval
    for binding in doc["materializations"][S3]["bindings"]:
        binding["resource"] = {"max_age": s3_max_age}
    if edit is not None:
        edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Incarnation:
    """One process of a task: its log and, once it ended, how."""

    proc: subprocess.Popen[bytes]
    log: Path
    signalled: str = ""
    """'' until the harness signals it: 'killed' or 'terminated' (a task never exits by itself)."""


class TaskProcess:
    """`python -m pipeline run CATALOG --task NAME [ARGS]`, restartable; each incarnation keeps its log.

    ``tasks`` runs several tasks in the one process (``name`` then only names its logs).
    """

    def __init__(self, name: str, catalog: Path, env: dict[str, str], logs: Path, args: list[str] | None = None,
                 tasks: Iterable[str] | None = None) -> None:
        self.name = name
        self.catalog = catalog
        self.env = env
        self.logs = logs
        self.args = [a for t in (tasks or [name]) for a in ("--task", t)] + list(args or [])
        self.runs: list[Incarnation] = []

    @property
    def current(self) -> Incarnation | None:
        return self.runs[-1] if self.runs else None

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        log = self.logs / f"{self.name.replace('/', '_')}.{len(self.runs) + 1}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", str(self.catalog), *self.args],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        self.runs.append(Incarnation(proc, log))

    def kill(self) -> None:
        """SIGKILL: the process ends at once, mid-whatever, as in a crash or an OOM kill."""
        run = self.current
        if run is not None and run.proc.poll() is None:
            run.signalled = "killed"
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait()

    def signal_stop(self) -> None:
        """Send SIGTERM once (a second one means "exit now, without flushing")."""
        run = self.current
        if run is not None and run.proc.poll() is None and not run.signalled:
            run.signalled = "terminated"
            run.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the exit code (0 = flushed and committed); SIGKILL after ``timeout``."""
        run = self.current
        assert run is not None
        self.signal_stop()
        try:
            return run.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
            raise AssertionError(f"{self.name} did not stop within {timeout:g}s of SIGTERM; log: {run.log}") from None

    def output(self, all_runs: bool = True) -> str:
        runs = self.runs if all_runs else self.runs[-1:]
        return "".join(r.log.read_text(errors="replace") for r in runs if r.log.exists())

    def exited_unexpectedly(self) -> list[str]:
        """Incarnations that ended without being asked to (a task process must never exit by itself)."""
        return [f"{r.log.name}: exit {r.proc.returncode}" for r in self.runs
                if not r.signalled and r.proc.poll() is not None]


class Pipeline:
    """Every task of a catalog as its own worker process, with the environment that points it at
    the sources and servers."""

    def __init__(self, catalog: Path, env: dict[str, str], logs: Path, tasks: Iterable[str] = TASKS,
                 args: list[str] | None = None) -> None:
        self.catalog = catalog
        self.env = env
        logs.mkdir(parents=True, exist_ok=True)
        self.tasks = {name: TaskProcess(name, catalog, env, logs, args) for name in tasks}

    def start(self) -> None:
        for task in self.tasks.values():
            task.start()

    def ensure_running(self) -> None:
        for task in self.tasks.values():
            if not task.running:
                task.start()

    def stop(self) -> dict[str, int]:
        """SIGTERM every task (all at once) and collect the exit codes."""
        running = [t for t in self.tasks.values() if t.running]
        for task in running:
            task.signal_stop()
        return {task.name: task.terminate() for task in running}

    def unexpected_exits(self) -> list[str]:
        return [f"{name}: {e}" for name, t in self.tasks.items() for e in t.exited_unexpectedly()]


def pipeline_env(services: Services, sources: SourceServer, log_dir: Path, *, s3_endpoint: str | None = None,
                 kafka: str | None = None, **extra: str) -> dict[str, str]:
    """The workers' environment: this interpreter's, minus any server settings, plus ours."""
    drop = {"KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER",
            "POSTGRES_PASSWORD", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SOPHIA_API_URL", "SOPHIA_API_TOKEN",
            "SOPHIA_AGENT_LOG_DIR", "SOPHIA_METRICS_URL", "LOCALFLOW_METRICS_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(services.env())
    if kafka is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka
    if s3_endpoint is not None:
        env["S3_ENDPOINT_URL"] = s3_endpoint
    env.update({
        "PYTHONUNBUFFERED": "1",
        "SOPHIA_API_URL": sources.url + API_PATH,
        "SOPHIA_API_TOKEN": sources.api.token,
        "SOPHIA_AGENT_LOG_DIR": str(log_dir),
        "SOPHIA_METRICS_URL": sources.url + METRICS_PATH,
        "S3_CREATE_BUCKET": "true",
        **extra,
    })
    return env


# ============================================================================ counting


@dataclass
class TopicContent:
    """A collection's topic and dead-letter topic, read to their high watermarks."""

    messages: list[tuple[int, int, Any, dict[str, Any] | None]] = field(default_factory=list)
    """(partition, offset, key value, document or None when not a JSON object)."""
    dead: list[dict[str, Any]] = field(default_factory=list)
    """Dead-letter envelopes."""

    @property
    def keys(self) -> set[Any]:
        return {k for _, _, k, _ in self.messages}

    def offsets(self) -> set[tuple[int, int]]:
        return {(p, o) for p, o, _, d in self.messages if d is not None}

    def dead_from(self, task: str) -> list[dict[str, Any]]:
        return [d for d in self.dead if d.get("task") == task]


def _key_value(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        values = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    return values[0] if isinstance(values, list) and len(values) == 1 else orjson.dumps(values).decode()


async def read_topics(bootstrap: str, collections: Iterable[str] = COLLECTIONS) -> dict[str, TopicContent]:
    """Every record and dead letter of the collections, read from the start."""
    kafka, nexts = KafkaConfig(bootstrap_servers=bootstrap), {}
    out = {c: TopicContent() for c in collections}
    for c, content in out.items():
        await _read_new(kafka, c, content, nexts)
    return out


async def _read_to_end_retried(kafka: KafkaConfig, name: str, from_offsets: dict[int, int]) -> list[Record]:
    """`read_to_end`, again with a fresh consumer when one stalls: right after a Tansu restart on S3
    storage a partition's fetch can stay empty below its high watermark for one consumer's life."""
    for attempt in range(3):
        try:
            return await read_to_end(kafka, name, timeout=30, from_offsets=from_offsets)
        except EndpointError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _read_new(kafka: KafkaConfig, collection: str, content: TopicContent,
                    nexts: dict[str, dict[int, int]]) -> None:
    """Append to `content` what the collection and its dead letters got past `nexts` (topic ->
    partition -> next offset, advanced here), so a census of a growing topic reads each record once."""
    for name, dead in ((topic(collection), False), (topic(collection) + ".dead", True)):
        seen = nexts.setdefault(name, {})
        for r in await _read_to_end_retried(kafka, name, seen):
            seen[r.partition] = r.offset + 1
            if dead:
                content.dead.append(orjson.loads(r.value))
                continue
            try:
                doc = orjson.loads(r.value)
            except orjson.JSONDecodeError:
                doc = None
            content.messages.append((r.partition, r.offset, _key_value(r.key), doc if isinstance(doc, dict) else None))


def dead_key(envelope: dict[str, Any], collection: str) -> Any:
    """The collection key of the document a dead letter holds (its original bytes), or its text."""
    original = envelope.get("original")
    try:
        doc = orjson.loads(original) if original is not None else None
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        if collection == PROCESSED:
            return doc.get("id")
        meta = doc.get("metadata")
        if isinstance(meta, dict) and "id" in meta:
            return meta["id"]
    return original if original is not None else envelope.get("original_base64")


@dataclass
class ArchivedObject:
    partition: int
    offsets: list[int]
    keys: list[Any]


_OBJECT = re.compile(r"/dt=\d{4}-\d{2}-\d{2}/hr=\d{2}/p=(\d+)/(\d{20})-(\d{20})\.jsonl(\.gz|\.zst)?$")


class ArchiveReader:
    """Reads the S3 archive back, object by object (cached: a data object never changes once named)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._cache: dict[tuple[str, str], ArchivedObject] = {}

    async def read(self, collection: str, key_of: Callable[[dict[str, Any]], Any]) -> list[ArchivedObject]:
        prefix = f"{S3_PREFIX}{collection}/"
        session = aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
        out = []
        async with session.client("s3", endpoint_url=self.endpoint) as s3:
            listed: list[tuple[str, str]] = []
            try:
                async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
                    listed += [(o["Key"], o["ETag"]) for o in page.get("Contents", [])]
            except s3.exceptions.NoSuchBucket:
                return []
            for key, etag in listed:
                m = _OBJECT.search(key)
                if m is None:
                    continue
                cached = self._cache.get((key, etag))
                if cached is None:
                    got = await s3.get_object(Bucket=S3_BUCKET, Key=key)
                    async with got["Body"] as body:
                        data = await body.read()
                    raw = _decompress(data, got.get("ContentEncoding"))
                    lines = raw.split(b"\n")[:-1] if raw else []
                    first, last = int(m.group(2)), int(m.group(3))
                    skipped: set[int] = set()
                    for gap in filter(None, got.get("Metadata", {}).get("gaps", "").split(",")):
                        lo, _, hi = gap.partition("-")
                        skipped.update(range(int(lo), int(hi) + 1))
                    offsets = [o for o in range(first, last + 1) if o not in skipped]
                    if len(offsets) != len(lines):
                        raise AssertionError(f"s3://{S3_BUCKET}/{key}: {len(lines)} lines for {len(offsets)} offsets")
                    cached = ArchivedObject(int(m.group(1)), offsets, [key_of(orjson.loads(x)) for x in lines])
                    self._cache[(key, etag)] = cached
                out.append(cached)
        return out


def _decompress(data: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def doc_key(collection: str) -> Callable[[Any], Any]:
    """The key of an archived line's document (None when it is not a keyed object)."""
    def key(doc: Any) -> Any:
        if not isinstance(doc, dict):
            return None
        if collection == PROCESSED:
            return doc.get("id")
        meta = doc.get("metadata")
        return meta.get("id") if isinstance(meta, dict) else None
    return key


@dataclass
class Endpoints:
    """What the materializations hold."""

    postgres: dict[str, list[Any]] = field(default_factory=dict)
    """collection -> key column values, one per row."""
    redis: dict[str, set[str]] = field(default_factory=dict)
    """collection -> ids (keys without their prefix)."""
    s3: dict[str, Counter[tuple[int, int]]] = field(default_factory=dict)
    """collection -> how many times each (partition, offset) is archived."""
    s3_keys: dict[str, set[Any]] = field(default_factory=dict)


class Census:
    """Counts what every stage holds, straight from the servers."""

    def __init__(self, bootstrap: str, postgres_url: str, redis_url: str, s3_endpoint: str) -> None:
        self.bootstrap = bootstrap
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.archive = ArchiveReader(s3_endpoint)
        self._kafka = KafkaConfig(bootstrap_servers=bootstrap)
        self._content = {c: TopicContent() for c in COLLECTIONS}
        self._next: dict[str, dict[int, int]] = {}

    async def topics(self) -> dict[str, TopicContent]:
        """What every collection holds now; only records new since the last look are fetched."""
        for c, content in self._content.items():
            await _read_new(self._kafka, c, content, self._next)
        return {c: TopicContent(messages=list(t.messages), dead=list(t.dead)) for c, t in self._content.items()}

    async def endpoints(self) -> Endpoints:
        out = Endpoints()
        conn = await asyncpg.connect(self.postgres_url, timeout=10)
        try:
            for collection, (table, column) in PG_TABLES.items():
                try:
                    rows = await conn.fetch(f'SELECT "{column}" FROM "{PG_SCHEMA}"."{table}"')
                except asyncpg.UndefinedTableError:
                    rows = []
                out.postgres[collection] = [r[0] for r in rows]
        finally:
            await conn.close()
        redis = Redis.from_url(self.redis_url, socket_timeout=60)
        try:
            for collection, prefix in REDIS_PREFIXES.items():
                ids = set()
                async for key in redis.scan_iter(match=_glob_escape(prefix) + "*", count=2000):
                    text = key.decode()
                    if text != REDIS_STREAM:
                        ids.add(text[len(prefix):])
                out.redis[collection] = ids
        finally:
            await redis.aclose()
        for collection in COLLECTIONS:
            objects = await self.archive.read(collection, doc_key(collection))
            counts: Counter[tuple[int, int]] = Counter()
            keys: set[Any] = set()
            for o in objects:
                counts.update((o.partition, off) for off in o.offsets)
                keys.update(o.keys)
            out.s3[collection] = counts
            out.s3_keys[collection] = keys
        return out


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# ============================================================================ judging


@dataclass
class Expected:
    """What the sources produced, so far."""

    api_ids: set[str] = field(default_factory=set)
    """Records with an id: each must be captured once (a key of sophia_raw_data)."""
    api_without_id: int = 0
    """Records the capture must dead-letter (no id)."""
    api_refused: set[str] = field(default_factory=set)
    """Ids whose documents Postgres cannot hold (dead letters of the processed collection)."""
    log_lines: set[int] = field(default_factory=set)
    log_too_long: int = 0
    log_refused: set[int] = field(default_factory=set)
    """Sequence numbers of lines Postgres cannot hold."""

    @property
    def source_records(self) -> int:
        return len(self.api_ids) + self.api_without_id + len(self.log_lines) + self.log_too_long


@dataclass
class Verdict:
    """The outcome of one check of the whole pipeline."""

    source_records: int = 0
    keys: int = 0
    resent: int = 0
    pg: tuple[int, int, int] = (0, 0, 0)
    redis: tuple[int, int, int] = (0, 0, 0)
    s3: tuple[int, int, int] = (0, 0, 0)
    """(materialized, dead letters, captured) of each endpoint, summed over its bindings."""
    lost: int = 0
    doubled: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.lost and not self.doubled

    def lose(self, n: int, what: str) -> None:
        if n > 0:
            self.lost += n
            self.problems.append(what)

    def double(self, n: int, what: str) -> None:
        if n > 0:
            self.doubled += n
            self.problems.append(what)


def _sample(values: Iterable[Any]) -> list[str]:
    return sorted(map(str, values))[:3]


def log_keys(content: TopicContent) -> dict[int, set[Any]]:
    """Sequence number of each captured `AgentLogs` line -> the keys it was captured under."""
    out: dict[int, set[Any]] = defaultdict(set)
    for _, _, key, doc in content.messages:
        seq = log_seq(doc or {})
        if seq is not None:
            out[seq].add(key)
    return out


def judge_captures(expected: Expected, topics: dict[str, TopicContent], v: Verdict) -> None:
    """Captures and derivation: every source record under exactly one key, derived once."""
    raw_ids = topics[RAW].keys
    v.lose(len(expected.api_ids - raw_ids), f"API records not captured: {_sample(expected.api_ids - raw_ids)}")
    v.double(len(raw_ids - expected.api_ids), f"raw keys that no API record has: {_sample(raw_ids - expected.api_ids)}")
    no_id = {d["original"] for d in topics[RAW].dead_from(API_TASK) if d.get("original")}
    v.lose(expected.api_without_id - len(no_id),
           f"{expected.api_without_id} API records without id, {len(no_id)} capture dead letters")
    by_seq = log_keys(topics[AGENT_LOGS])
    v.lose(len(expected.log_lines - by_seq.keys()), f"log lines not captured: {_sample(expected.log_lines - by_seq.keys())}")
    v.double(sum(len(k) - 1 for k in by_seq.values()), "log lines captured under two keys: "
             f"{_sample(s for s, k in by_seq.items() if len(k) > 1)}")
    too_long = {d["error"].split(": line of")[0] for d in topics[AGENT_LOGS].dead_from(LOGS_TASK)
                if "longer than max_line_bytes" in d.get("error", "")}
    v.lose(expected.log_too_long - len(too_long),
           f"{expected.log_too_long} over-long log lines, {len(too_long)} capture dead letters")
    derived = topics[PROCESSED].keys
    v.lose(len(raw_ids - derived), f"raw documents not derived: {_sample(raw_ids - derived)}")
    v.double(len(derived - raw_ids), f"derived keys without a raw document: {_sample(derived - raw_ids)}")


def judge(expected: Expected, before: dict[str, TopicContent], ends: Endpoints,
          after: dict[str, TopicContent]) -> Verdict:
    """Check the whole pipeline.

    ``before``: the topics once the sources were captured; ``ends``: the endpoints afterwards;
    ``after``: the topics again. Metrics keep flowing, so each endpoint must hold at least what
    ``before`` holds and nothing that ``after`` does not.
    """
    v = Verdict(source_records=expected.source_records)
    judge_captures(expected, before, v)
    v.keys = sum(len(before[c].keys) for c in COLLECTIONS)
    v.resent = sum(len(before[c].messages) - len(before[c].keys) for c in COLLECTIONS)

    def endpoint(task: str, held: dict[str, Any], bindings: Iterable[str]) -> tuple[int, int, int]:
        """Per binding: captured keys = materialized keys + dead-lettered keys, none in both."""
        materialized = dead_total = captured = 0
        for c in bindings:
            want, allowed = before[c].keys, after[c].keys
            dead = {dead_key(d, c) for d in after[c].dead_from(task)}
            have = held[c]
            if isinstance(have, list):  # Postgres rows
                v.double(len(have) - len(set(have)), f"{task} {c}: keys in two rows")
                have = set(have)
            missing = want - have - dead
            v.lose(len(missing), f"{task} {c}: {len(missing)} keys missing, e.g. {_sample(missing)}")
            v.double(len(have & dead), f"{task} {c}: keys both materialized and dead-lettered: {_sample(have & dead)}")
            extra = have - allowed
            if extra:
                v.problems.append(f"{task} {c}: {len(extra)} keys that no document has, e.g. {_sample(extra)}")
            materialized += len(have & want)
            dead_total += len(dead & want)
            captured += len(want)
        return materialized, dead_total, captured

    v.pg = endpoint(POSTGRES, ends.postgres, PG_TABLES)
    v.redis = endpoint(REDIS, dict(ends.redis), REDIS_PREFIXES)
    s3 = [0, 0, 0]
    for c in COLLECTIONS:
        counts = ends.s3[c]
        want, allowed = before[c].offsets(), after[c].offsets()
        twice = [o for o, n in counts.items() if n > 1]
        v.double(len(twice), f"{S3} {c}: offsets archived in two objects, e.g. {twice[:3]}")
        missing = want - counts.keys()
        v.lose(len(missing), f"{S3} {c}: {len(missing)} documents not archived, e.g. {sorted(missing)[:3]}")
        extra = counts.keys() - allowed
        if extra:
            v.problems.append(f"{S3} {c}: {len(extra)} archived offsets that the topic does not hold")
        s3[0] += len(want & counts.keys())
        s3[1] += len(after[c].dead_from(S3))
        s3[2] += len(want)
    v.s3 = (s3[0], s3[1], s3[2])
    # Postgres dead-letters exactly the documents it cannot hold.
    by_seq = log_keys(before[AGENT_LOGS])
    refused = {PROCESSED: set(expected.api_refused),
               AGENT_LOGS: {k for s in expected.log_refused for k in by_seq.get(s, ())}, METRICS: set()}
    for c, keys in refused.items():
        dead = {dead_key(d, c) for d in after[c].dead_from(POSTGRES)}
        if dead - keys:
            v.problems.append(f"{POSTGRES} {c}: dead-lettered documents it can hold: {_sample(dead - keys)}")
        if keys - dead:
            v.problems.append(f"{POSTGRES} {c}: documents it cannot hold are not dead letters (yet): "
                              f"{_sample(keys - dead)}")
    return v


async def settle(census: Census, expected: Expected, *, within: float = 180) -> tuple[Verdict, float]:
    """Wait until the sources are captured and every endpoint holds everything; then judge.

    Returns the verdict of the last look (good, or the deadline passed, or something that
    waiting cannot fix, such as a doubled document) and the seconds it took.
    """
    started = time.monotonic()
    deadline = started + within
    while True:
        before = await census.topics()
        pending = Verdict()
        judge_captures(expected, before, pending)
        if not pending.lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)  # polling the topics, bounded by the deadline
    v = pending
    while time.monotonic() <= deadline:
        ends = await _endpoints_or_none(census)
        if ends is not None:
            v = judge(expected, before, ends, await census.topics())
            if not v.lost:
                break
        await asyncio.sleep(1)  # polling the endpoints, bounded by the deadline
    return v, time.monotonic() - started


async def _endpoints_or_none(census: Census) -> Endpoints | None:
    """The endpoints' content, or None while one of them cannot be read (e.g. it is restarting)."""
    try:
        return await census.endpoints()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("redis", "botocore", "aiobotocore"):
            return None
        raise


# ============================================================================ the table


@dataclass
class Row:
    trial: int
    kind: str
    fault: str
    new_records: int
    verdict: Verdict
    seconds: float


class FaultTable:
    """Trials, their faults and results: printed, written to a file, summarised at the session end."""

    columns = ("#", "kind", "fault", "new", "sources", "keys", "resent", "postgres rows+dead/keys",
               "redis keys+dead/keys", "s3 docs+dead/docs", "lost", "doubled", "result", "s")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []

    def add(self, kind: str, fault: str, new_records: int, verdict: Verdict, seconds: float) -> Row:
        row = Row(len(self.rows) + 1, kind, fault, new_records, verdict, seconds)
        self.rows.append(row)
        self.path.write_text(self.render() + "\n")
        return row

    def cells(self, row: Row) -> list[str]:
        v = row.verdict

        def ep(t: tuple[int, int, int]) -> str:
            return f"{t[0]}+{t[1]}/{t[2]}"

        return [str(row.trial), row.kind, row.fault, str(row.new_records), str(v.source_records), str(v.keys),
                str(v.resent), ep(v.pg), ep(v.redis), ep(v.s3), str(v.lost), str(v.doubled),
                "ok" if v.ok else "FAIL", f"{row.seconds:.0f}"]

    def render(self) -> str:
        table = [list(self.columns)] + [self.cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(self.columns))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.rows:
            for p in r.verdict.problems:
                lines.append(f"  trial {r.trial}: {p}")
        return "\n".join(lines)

    def summary(self) -> str:
        lost = sum(r.verdict.lost for r in self.rows)
        doubled = sum(r.verdict.doubled for r in self.rows)
        failed = sum(not r.verdict.ok for r in self.rows)
        kinds = len({r.kind for r in self.rows})
        return (f"fault injection: {len(self.rows)} trials of {kinds} kinds, {lost} lost, {doubled} doubled, "
                f"{failed} failed (table: {self.path})")


class TableReport:
    """A pytest plugin object that prints the fault table in the terminal summary."""

    def __init__(self, table: FaultTable) -> None:
        self.table = table

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.table.rows:
            terminalreporter.section("localflow fault injection")
            terminalreporter.write_line(self.table.render())
            terminalreporter.write_line(self.table.summary())


# ============================================================================ small helpers


def api_records(prefix: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Records of every Sophia type, with ids ``<prefix>-<n>``."""
    types = ("agent_interaction", "user_query", "user_response", "performance_metric", "system_metric",
             "system_event")
    return [{"id": f"{prefix}-{i}", "type": rng.choice(types), "agent_id": "research-agent",
             "confidence": round(rng.random(), 3), "value": i} for i in range(count)]
