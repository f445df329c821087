"""The sources and servers a pipeline test plays: Sophia's API and /metrics, agent log files, a proxy.

* ``SourceServer``: a real HTTP server (its own thread and event loop) that plays the Sophia
  API (`/v1/records`, bearer token, next-link pages, `since` cursor) and an app's `/metrics`,
  and can misbehave on demand: hang, reset connections, answer slowly. Extra paths serve the
  bad-input corpus. ``AgentLogs`` appends numbered lines to log files.
* ``FaultProxy``: a TCP proxy in front of a server that can go down (connections refused, open
  ones reset) and come back, for a server whose restart would lose its data (moto keeps S3 in
  memory; real S3 does not forget).
* ``serve_on_loopback``: any aiohttp app a test writes, on a free 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web

from pipeline.embedded.services import HOST, free_port

T = TypeVar("T")

API_PATH = "/v1/records"
INSTANCE_HEADER = "X-Localflow-Instance"
"""Sent by the API capture with the worker's LOCALFLOW_TEST_INSTANCE (default "first"): who polled."""
METRICS_PATH = "/metrics"
PAGE_SIZE = 20


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


def api_records(prefix: str, count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Records of every Sophia type, with ids ``<prefix>-<n>``."""
    types = ("agent_interaction", "user_query", "user_response", "performance_metric", "system_metric",
             "system_event")
    return [{"id": f"{prefix}-{i}", "type": rng.choice(types), "agent_id": "research-agent",
             "confidence": round(rng.random(), 3), "value": i} for i in range(count)]


async def serve_on_loopback(app: Any) -> tuple[Any, str]:
    """Start an aiohttp `app` on a free 127.0.0.1 port: (its runner, whose cleanup() stops it; its URL)."""
    runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}"
