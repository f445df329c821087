"""Simulated Sophia sources for `localflow demo` and docker compose: an API, agent logs, /metrics.

Why: the Sophia catalog reads three things we cannot run here (the platform's HTTP API, its
agents' log files, an app's Prometheus endpoint). These are small *real* servers and writers
that behave like them, so the whole flow can be seen working on one machine:

* ``SophiaApi``: ``GET /v1/records`` behind a bearer token (401 otherwise). Records of every
  ``type`` (agent_interaction, user_query, ...) are created over time (Poisson arrivals at
  ``rate`` per second, plus a backlog), each with an ``id``, a ``timestamp`` and an equal
  ``updated_at``, both strictly increasing. The body is
  ``{"records": [...], "next": <url>|null, "next_cursor": <str>|null, "has_more": bool}`` and a
  ``Link: <url>; rel="next"`` header, so any of the http capture's paginations works
  (``next_link`` at ``/next``, ``link_header``, ``cursor`` at ``/next_cursor`` with param
  ``cursor``). ``since=<timestamp>`` returns only newer records (the incremental cursor);
  ``limit`` (1-1000, default 100) and ``type=a,b`` filter pages.
* ``AgentLogWriter``: appends JSON lines (``<agent>.jsonl``) and plain text lines with levels
  (``<agent>.log``) and rotates each file by rename (``x.log`` -> ``x.log.1`` -> ...).
* ``DemoMetrics``: prometheus_client's own exporter on a private registry, with counters,
  gauges and histograms that move every second (and count the API's real requests).

``DemoSources`` runs all three; `localflow demo-sources` serves them for docker compose.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hmac
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from wsgiref.simple_server import WSGIServer

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["AgentLogWriter", "DemoMetrics", "DemoSources", "RecordStore", "SophiaApi", "RECORD_TYPES"]

RECORD_TYPES = ("agent_interaction", "user_query", "user_response",
                "performance_metric", "system_metric", "system_event")
_TYPE_WEIGHTS = (30, 15, 15, 15, 15, 10)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BACKLOG_SPAN_S = 3600.0
"""The backlog's records are spread over the hour before the store starts."""

_AGENTS = ("research-agent", "support-agent", "sales-agent", "ops-agent")
_MODELS = ("gpt-4o", "claude-3-5-sonnet", "llama-3.1-70b", "mistral-large")
_CHANNELS = ("web", "slack", "api", "email")
_QUERIES = (
    "What were last quarter's top three churn drivers?",
    "Summarize the open incidents for the payments service.",
    "Draft a follow-up email for the Acme renewal.",
    "Which agents had the highest escalation rate this week?",
    "Compare pipeline velocity in EMEA and NA.",
    "Find the runbook for rotating the Redis password.",
    "How many support tickets mention 'invoice' since Monday?",
)
_RESPONSES = (
    "Here is a summary with the three most relevant sources.",
    "I found 4 open incidents; two are sev-2 and assigned.",
    "Draft ready; I kept the tone consistent with the last thread.",
    "The support agent leads with 7.2% escalations, up from 5.9%.",
    "EMEA is 12% faster from qualification to close.",
)
_ACTIONS = ("retrieve_context", "call_tool", "answer", "handoff", "summarize")
_PERF = (("response_time_ms", "ms", 150.0, 4000.0), ("tokens_per_second", "1/s", 20.0, 160.0),
         ("queue_wait_ms", "ms", 0.0, 800.0), ("cache_hit_ratio", "ratio", 0.2, 0.99))
_SYS = (("cpu_percent", "%", 3.0, 97.0), ("memory_percent", "%", 20.0, 92.0),
        ("disk_percent", "%", 30.0, 88.0), ("queue_depth", "messages", 0.0, 500.0))
_COMPONENTS = ("api-gateway", "orchestrator", "vector-store", "llm-router", "scheduler")
_EVENTS = (("info", "deploy_finished", "rolled out build {n}"), ("info", "cache_flushed", "flushed {n} entries"),
           ("warning", "rate_limited", "upstream answered 429 {n} times in 1m"),
           ("warning", "slow_dependency", "p95 latency {n} ms over budget"),
           ("error", "worker_restarted", "worker exited with code {n}; restarted"))
_HOSTS = ("sophia-app-1", "sophia-app-2", "sophia-worker-1")


def format_micros(micros: int) -> str:
    """RFC 3339 UTC with microseconds, always the same width, so strings sort like times."""
    return (_EPOCH + timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> int:
    """Microseconds since the epoch of an ISO 8601 timestamp (no zone means UTC)."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(microseconds=1)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


class RecordStore:
    """Records created over time, readable in pages after a sequence number or a timestamp.

    Creation is lazy: `advance()` creates every record whose (Poisson) arrival time has come,
    so no background task is needed and a record never appears with a timestamp older than
    one already served; the incremental cursor therefore never misses one. The oldest
    records beyond `retain` are forgotten (a long-running compose stack stays small).
    """

    def __init__(self, *, rate: float = 5.0, backlog: int = 120, seed: int | None = None,
                 retain: int = 100_000, clock: Callable[[], float] | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0 records per second, got {rate}")
        self.rate = rate
        self.retain = max(retain, 1)
        self._clock = clock or _wall_clock
        self._rng = random.Random(seed)
        self._records: list[dict[str, Any]] = []
        self._micros: list[int] = []  # timestamps of _records, for bisect on `since`
        self._first_seq = 0
        self._next_seq = 0
        self._last_micros = 0
        start = self._clock()
        for i in range(backlog):
            self._create(start - BACKLOG_SPAN_S * (backlog - i) / backlog)
        self._next_at = start + self._rng.expovariate(rate)

    @property
    def total(self) -> int:
        """Records created so far (including forgotten ones)."""
        return self._next_seq

    def advance(self) -> None:
        """Create every record whose arrival time has come."""
        now = self._clock()
        while self._next_at <= now:
            self._create(self._next_at)
            self._next_at += self._rng.expovariate(self.rate)
        if len(self._records) > self.retain:
            drop = len(self._records) - self.retain
            del self._records[:drop], self._micros[:drop]
            self._first_seq += drop

    def page(self, *, after: int | None = None, since: int | None = None, types: set[str] | None = None,
             limit: int = 100) -> tuple[list[dict[str, Any]], int | None]:
        """Up to `limit` records after sequence `after` (else after time `since`, else from the first).

        Returns the records and the sequence to continue after, or None at the end.
        """
        if after is not None:
            index = max(0, after + 1 - self._first_seq)
        elif since is not None:
            index = bisect.bisect_right(self._micros, since)
        else:
            index = 0
        out: list[dict[str, Any]] = []
        records = self._records
        while index < len(records) and len(out) < limit:
            record = records[index]
            if types is None or record["type"] in types:
                out.append(record)
            index += 1
        more = index < len(records)
        return out, (self._first_seq + index - 1 if more else None)

    def _create(self, at: float) -> None:
        micros = max(int(at * 1_000_000), self._last_micros + 1)  # strictly increasing
        self._last_micros = micros
        seq = self._next_seq
        self._next_seq += 1
        rng = self._rng
        kind = RECORD_TYPES[seq] if seq < len(RECORD_TYPES) else rng.choices(RECORD_TYPES, _TYPE_WEIGHTS)[0]
        ts = format_micros(micros)
        record: dict[str, Any] = {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "type": kind,
            "timestamp": ts,
            "updated_at": ts,
            **_BODIES[kind](rng),
        }
        self._records.append(record)
        self._micros.append(micros)


def _wall_clock() -> float:
    return datetime.now(UTC).timestamp()


def _session(rng: random.Random) -> str:
    return f"sess-{rng.getrandbits(32):08x}"


def _user(rng: random.Random) -> tuple[str, str]:
    n = rng.randrange(1, 400)
    return f"user-{n:04d}", f"user{n}@example.com"


def _agent_interaction(rng: random.Random) -> dict[str, Any]:
    user_id, _ = _user(rng)
    return {"agent_id": rng.choice(_AGENTS), "session_id": _session(rng), "user_id": user_id,
            "action": rng.choice(_ACTIONS), "model": rng.choice(_MODELS),
            "input_tokens": rng.randrange(80, 4000), "output_tokens": rng.randrange(20, 1200),
            "latency_ms": round(rng.lognormvariate(6.5, 0.5), 1),
            "confidence": round(rng.betavariate(8, 2), 4),
            "outcome": rng.choices(("success", "escalated", "error"), (90, 8, 2))[0]}


def _user_query(rng: random.Random) -> dict[str, Any]:
    user_id, email = _user(rng)
    return {"session_id": _session(rng), "user_id": user_id, "user_email": email,
            "channel": rng.choice(_CHANNELS), "query": rng.choice(_QUERIES), "language": "en"}


def _user_response(rng: random.Random) -> dict[str, Any]:
    return {"session_id": _session(rng), "agent_id": rng.choice(_AGENTS), "response": rng.choice(_RESPONSES),
            "confidence": round(rng.betavariate(6, 2), 4), "latency_ms": round(rng.lognormvariate(7, 0.4), 1),
            "rating": rng.choice((None, None, 3, 4, 5))}


def _performance_metric(rng: random.Random) -> dict[str, Any]:
    name, unit, low, high = rng.choice(_PERF)
    return {"agent_id": rng.choice(_AGENTS), "metric": name, "value": round(rng.uniform(low, high), 3),
            "unit": unit, "window_seconds": 60}


def _system_metric(rng: random.Random) -> dict[str, Any]:
    name, unit, low, high = rng.choice(_SYS)
    return {"host": rng.choice(_HOSTS), "metric": name, "value": round(rng.uniform(low, high), 2), "unit": unit}


def _system_event(rng: random.Random) -> dict[str, Any]:
    severity, event, message = rng.choice(_EVENTS)
    return {"component": rng.choice(_COMPONENTS), "severity": severity, "event": event,
            "message": message.format(n=rng.randrange(1, 900))}


_BODIES: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "agent_interaction": _agent_interaction, "user_query": _user_query, "user_response": _user_response,
    "performance_metric": _performance_metric, "system_metric": _system_metric, "system_event": _system_event,
}


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------

RECORDS_PATH = "/v1/records"
MAX_LIMIT = 1000


class _BadRequest(Exception):
    """A query parameter the API cannot use; answered with 400 and the reason."""


def encode_cursor(seq: int) -> str:
    """An opaque page cursor (clients must not build or parse it)."""
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, seq = text.partition(":")
        if prefix != "after":
            raise ValueError(prefix)
        return int(seq)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _BadRequest(f"cursor {cursor!r} is not one this API issued (pass `next_cursor` unchanged)") from None


class SophiaApi:
    """The simulated Sophia AI platform API (an aiohttp application)."""

    def __init__(self, store: RecordStore, token: str, metrics: DemoMetrics | None = None) -> None:
        if not token:
            raise ValueError("the API needs a bearer token (SOPHIA_API_TOKEN)")
        self.store = store
        self._token = token.encode()
        self.metrics = metrics
        self.requests = 0
        self.unauthorized = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(RECORDS_PATH, self._records)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "records": self.store.total})

    async def _records(self, request: web.Request) -> web.Response:
        self.requests += 1
        if not self._authorized(request):
            self.unauthorized += 1
            return self._answer(401, {"error": "unauthorized",
                                      "message": "send `Authorization: Bearer <SOPHIA_API_TOKEN>`"},
                                {"WWW-Authenticate": 'Bearer realm="sophia", error="invalid_token"'})
        try:
            limit = _int_param(request, "limit", 100, 1, MAX_LIMIT)
            cursor = request.query.get("cursor")
            since_text = request.query.get("since")
            after = decode_cursor(cursor) if cursor else None
            since = _time_param(since_text) if since_text and after is None else None
            types = _types_param(request)
        except _BadRequest as e:
            return self._answer(400, {"error": "bad_request", "message": str(e)})
        self.store.advance()
        records, next_seq = self.store.page(after=after, since=since, types=types, limit=limit)
        next_cursor = encode_cursor(next_seq) if next_seq is not None else None
        next_url = str(request.url.update_query(cursor=next_cursor)) if next_cursor else None
        body = {"records": records, "next": next_url, "next_cursor": next_cursor, "has_more": next_url is not None}
        return self._answer(200, body, {"Link": f'<{next_url}>; rel="next"'} if next_url else None)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token)

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
        if self.metrics is not None:
            self.metrics.api_requests.labels(RECORDS_PATH, str(status)).inc()
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                            headers=headers)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _BadRequest(f"{name}={text!r} is not an integer") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name}={value} is out of range {low}..{high}")
    return value


def _time_param(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError:
        raise _BadRequest(f"since={text!r} is not an ISO 8601 timestamp (e.g. 2026-01-31T12:00:00Z)") from None


def _types_param(request: web.Request) -> set[str] | None:
    text = request.query.get("type")
    if not text:
        return None
    types = {t.strip() for t in text.split(",") if t.strip()}
    unknown = types - set(RECORD_TYPES)
    if unknown:
        raise _BadRequest(f"unknown type(s) {sorted(unknown)}; known: {', '.join(RECORD_TYPES)}")
    return types


# --------------------------------------------------------------------------------------------
# Agent logs
# --------------------------------------------------------------------------------------------


@dataclass
class _LogFile:
    path: Path
    json: bool
    fd: int | None = None
    size: int = 0


class AgentLogWriter:
    """Appends agent log lines to files under `directory` and rotates them by rename.

    Half the agents write JSON lines (``<agent>.jsonl``), the others plain text with a level
    (``<agent>.log``). A file reaching `rotate_bytes` is renamed to ``<name>.1`` (older ones
    shift to ``.2`` ... ``.<keep>``, the oldest is deleted) and a new file is started, as
    logrotate's default does. Each line is one ``write`` on an O_APPEND descriptor, so a reader
    never sees half a line.
    """

    def __init__(self, directory: Path, *, rate: float = 5.0, rotate_bytes: int = 64 * 1024, keep: int = 3,
                 seed: int | None = None, metrics: DemoMetrics | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"log rate must be > 0 lines per second, got {rate}")
        self.directory = directory
        self.rate = rate
        self.rotate_bytes = rotate_bytes
        self.keep = max(keep, 1)
        self.metrics = metrics
        self._rng = random.Random(seed)
        self._files = {agent: _LogFile(directory / f"{agent}.{'jsonl' if i % 2 == 0 else 'log'}", i % 2 == 0)
                       for i, agent in enumerate(_AGENTS)}
        self.lines = 0
        self.rotations = 0

    def open(self) -> None:
        """Create the directory; fail now, with a clear message, if it is not writable."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".localflow-write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OSError(f"agent log directory {self.directory} is not writable ({e.strerror}); "
                          "pass --log-dir with a directory you can write") from e

    def close(self) -> None:
        for f in self._files.values():
            if f.fd is not None:
                os.close(f.fd)
                f.fd = None

    async def run(self, stopping: asyncio.Event, *, burst: int = 20) -> None:
        """Write `burst` lines at once (so a tailer finds some at start), then about `rate` per second."""
        for _ in range(burst):
            self.write_line()
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), timeout=self._rng.expovariate(self.rate))
            except TimeoutError:
                self.write_line()

    def write_line(self) -> None:
        agent = self._rng.choice(_AGENTS)
        f = self._files[agent]
        level = self._rng.choices(("DEBUG", "INFO", "WARNING", "ERROR"), (10, 70, 15, 5))[0]
        line = self._json_line(agent, level) if f.json else self._text_line(agent, level)
        if f.fd is None:
            f.fd = os.open(f.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            f.size = os.fstat(f.fd).st_size
        os.write(f.fd, line)
        f.size += len(line)
        self.lines += 1
        if self.metrics is not None:
            self.metrics.log_lines.labels(agent, level.lower()).inc()
        if f.size >= self.rotate_bytes:
            self._rotate(f)

    def _rotate(self, f: _LogFile) -> None:
        assert f.fd is not None
        os.close(f.fd)
        f.fd, f.size = None, 0
        def generation(n: int) -> Path:
            return f.path.with_name(f"{f.path.name}.{n}")

        last = 0
        while last < self.keep and generation(last + 1).exists():
            last += 1
        if last == self.keep:
            generation(last).unlink()
            last -= 1
        for n in range(last, 0, -1):
            generation(n).rename(generation(n + 1))
        f.path.rename(generation(1))
        self.rotations += 1

    def _now(self) -> str:
        return format_micros(int(_wall_clock() * 1_000_000))

    def _json_line(self, agent: str, level: str) -> bytes:
        rng = self._rng
        event = rng.choice(("task_started", "tool_call", "task_finished", "retrieval", "llm_call"))
        doc = {"timestamp": self._now(), "level": level.lower(), "agent": agent, "event": event,
               "session_id": _session(rng), "duration_ms": round(rng.lognormvariate(5.5, 0.8), 1),
               "message": f"{event.replace('_', ' ')} for {rng.choice(_ACTIONS)}"}
        if level == "ERROR":
            doc["error"] = rng.choice(("TimeoutError: upstream took > 30s", "RateLimited: 429 from llm-router"))
        return orjson.dumps(doc) + b"\n"

    def _text_line(self, agent: str, level: str) -> bytes:
        rng = self._rng
        message = {
            "DEBUG": f"context window at {rng.randrange(10, 95)}% for {_session(rng)}",
            "INFO": f"handled request in {rng.randrange(80, 3000)} ms (model {rng.choice(_MODELS)})",
            "WARNING": f"retrying tool call after {rng.randrange(1, 8)}s backoff",
            "ERROR": "tool call failed: connection reset by peer",
        }[level]
        return f"{self._now()} {level} [{agent}] {message}\n".encode()


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class DemoMetrics:
    """The app's /metrics: prometheus_client's exporter on a private registry (not localflow's)."""

    def __init__(self, seed: int | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.api_requests = Counter("sophia_api_requests", "Requests answered by the Sophia API.",
                                    ["endpoint", "status"], registry=r)
        self.log_lines = Counter("sophia_agent_log_lines", "Log lines written by agents.", ["agent", "level"],
                                 registry=r)
        self.agent_errors = Counter("sophia_agent_errors", "Agent task failures.", ["agent"], registry=r)
        self.active_sessions = Gauge("sophia_agent_active_sessions", "Open agent sessions.", ["agent"], registry=r)
        self.cpu = Gauge("sophia_system_cpu_ratio", "CPU busy ratio of the app host.", registry=r)
        self.memory = Gauge("sophia_system_memory_bytes", "Resident memory of the app.", registry=r)
        self.response = Histogram("sophia_agent_response_seconds", "Agent response time.", ["agent"],
                                  buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self._rng = random.Random(seed)
        self._sessions = dict.fromkeys(_AGENTS, 10)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.step()

    def step(self) -> None:
        """Move every series a little, as a live app's would."""
        rng = self._rng
        for agent in _AGENTS:
            self._sessions[agent] = max(0, self._sessions[agent] + rng.randint(-3, 4))
            self.active_sessions.labels(agent).set(self._sessions[agent])
            for _ in range(rng.randint(1, 6)):
                self.response.labels(agent).observe(rng.lognormvariate(-0.5, 0.8))
            if rng.random() < 0.05:
                self.agent_errors.labels(agent).inc()
        self.cpu.set(round(min(1.0, max(0.0, rng.gauss(0.35, 0.15))), 4))
        self.memory.set(int(rng.gauss(1.6e9, 1e8)))

    def serve(self, host: str, port: int) -> int:
        """Start the exporter's HTTP server (its own thread); returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# --------------------------------------------------------------------------------------------
# All three
# --------------------------------------------------------------------------------------------


@dataclass
class DemoSources:
    """The API, the log writer and /metrics, started and stopped together.

    Ports 0 pick free ones; read `api_url` and `metrics_url` after `start()`.
    """

    log_dir: Path
    token: str
    host: str = "127.0.0.1"
    api_port: int = 0
    metrics_port: int = 0
    rate: float = 5.0
    """API records created per second (after the backlog)."""
    backlog: int = 120
    log_rate: float = 5.0
    rotate_bytes: int = 64 * 1024
    seed: int | None = None
    metrics: DemoMetrics = field(init=False)
    store: RecordStore = field(init=False)
    api: SophiaApi = field(init=False)
    logs: AgentLogWriter = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = DemoMetrics(self.seed)
        self.store = RecordStore(rate=self.rate, backlog=self.backlog, seed=self.seed)
        self.api = SophiaApi(self.store, self.token, self.metrics)
        self.logs = AgentLogWriter(self.log_dir, rate=self.log_rate, rotate_bytes=self.rotate_bytes,
                                   seed=self.seed, metrics=self.metrics)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def _url_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def api_url(self) -> str:
        return f"http://{self._url_host}:{self.api_port}{RECORDS_PATH}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._url_host}:{self.metrics_port}/metrics"

    async def start(self) -> None:
        self.logs.open()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.api_port))
            self.api_port = sock.getsockname()[1]
            self._runner = web.AppRunner(self.api.app(), access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            self.metrics_port = self.metrics.serve(self.host, self.metrics_port)
        except BaseException:
            await self.stop()
            raise
        self._tasks = [asyncio.create_task(self.logs.run(self._stopping), name="demo-agent-logs"),
                       asyncio.create_task(self._move_metrics(), name="demo-metrics")]

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.to_thread(self.metrics.shutdown)
        self.logs.close()

    async def _move_metrics(self) -> None:
        while not self._stopping.is_set():
            self.metrics.step()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=1.0)
            except TimeoutError:
                pass

    def stats(self) -> dict[str, int]:
        """Counts for the demo's live view."""
        return {"api_records": self.store.total, "api_requests": self.api.requests,
                "api_unauthorized": self.api.unauthorized, "log_lines": self.logs.lines,
                "log_rotations": self.logs.rotations}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
