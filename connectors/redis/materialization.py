"""The `redis` materialization: the latest document per key, an optional live stream, and resume.

How a batch is made durable: its records are cut into chunks of ``advanced.chunk_size``
documents, and each chunk is one EVALSHA of ``scripts.APPLY``, which in one atomic step checks
this worker's fence of every partition in the chunk, writes each document unless its key already
holds a newer source position, XADDs applied documents to their stream, and stores the chunk's next
offsets in the checkpoint hash. All chunks of a batch travel in one pipeline (one round trip).
With ``advanced.overlap`` (the default) ``apply`` sends them and returns once the batch before is
applied, reporting that one, so the next batch is read and encoded while Redis runs this one;
batches still reach Redis one after the other, since each chunk's expected checkpoints are the
last chunk's.
A crash between chunks leaves Redis at a chunk boundary with a matching checkpoint, so a restart
resumes exactly there; a stream never gets an entry twice, because a re-read document is refused
by the position its key holds and refused documents are not streamed.

State kept in Redis (``advanced.state_prefix``, default ``localflow:``):
``checkpoint:<task>`` and ``fence:<task>``, hashes with a field ``<topic>:<partition>``, and
``pos:<key>``, the source position ``<topic>:<partition>:<offset>`` a key's value came from (with
the key's TTL): a derived document's ``localflow-source``, else its own record's (``Record.source``).
A document is refused unless its position is newer than the key's in the same clock (topic and
partition): so a stalled derivation worker's late outputs, a replay or a re-delivery never make a
key older, and two bindings whose templates render the same key never refuse each other's
documents (their topics differ: the later write wins).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hiredis  # redis[hiredis], a dependency
import orjson
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    DataError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from connectors.redis import scripts
from connectors.redis.config import RedisBinding, RedisConfig, Template, default_template, parse_template
from pipeline.sdk.connector import Check
from pipeline.sdk.errors import ConfigError, EndpointError, Fenced, scrub
from pipeline.sdk.inflight import InFlight
from pipeline.sdk.materialization import Applied, Batch, Materialization, Offsets
from pipeline.sdk.pointers import MISSING, resolve
from pipeline.sdk.records import Record, TopicPartition

T = TypeVar("T")

TRANSIENT: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
"""Worth retrying: the server is down, restarting (BusyLoadingError), slow, or failing over."""

CHUNK_BYTES = 4 * 1024 * 1024
"""A chunk also ends at this many argument bytes, so one script call stays short."""

VERIFY_EVERY = 5.0
"""While idle, check this often that Redis still holds our fences (a restart may have emptied it)."""


class StateLost(EndpointError):
    """Redis no longer holds what this worker wrote (restarted without persistence, or from an
    older snapshot). The task restarts and resumes from the checkpoint Redis holds, rewriting
    what is missing."""


@dataclass(slots=True)
class _Binding:
    collection: str
    template: Template
    mode: str  # "j": JSON string, "h": hash
    ttl_ms: int  # 0: no TTL
    stream: str  # "": no stream
    maxlen: int


@dataclass
class _Chunk:
    """Script arguments of up to chunk_size documents, and the partitions they advance."""

    parts: dict[TopicPartition, int] = field(default_factory=dict)
    """Partition -> next offset after this chunk."""
    clocks: dict[str, int] = field(default_factory=dict)
    """Source clock (``<topic>:<partition>``) -> its 1-based index in the script's clock table."""
    args: list[Any] = field(default_factory=list)
    docs: dict[int, int] = field(default_factory=dict)
    """Documents per binding index (what ``apply`` says it wrote)."""
    size: int = 0
    bytes: int = 0


def client(config: RedisConfig) -> Redis:
    """A client that never retries by itself: the materialization decides (see ``_retrying``)."""
    adv = config.advanced
    password = config.password.get_secret_value() if config.password else None
    common: dict[str, Any] = {
        "db": config.db, "username": config.username, "password": password,
        "socket_connect_timeout": adv.connect_timeout, "socket_timeout": adv.socket_timeout,
        "retry": Retry(NoBackoff(), 0), "client_name": "localflow",
    }
    if config.url is not None:
        redis = Redis.from_url(config.url.get_secret_value(), **common)
    else:
        redis = Redis(host=config.host, port=config.port, ssl=config.tls, **common)
    pool = redis.connection_pool
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return redis


class _HiredisPacking:
    """Commands packed by hiredis (C) instead of redis-py's asyncio packer (Python, about 1 us per
    argument: most of a worker's CPU per document with five script arguments each)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])  # "SCRIPT LOAD": two words, as redis-py does
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as e:
            raise DataError(str(e)) from e

    def pack_commands(self, commands: Any) -> list[bytes]:
        return [self.pack_command(*command)[0] for command in commands]  # written in turn, never joined


_PACKING: dict[type, type] = {}


def _hiredis_packing(cls: type[T]) -> type[T]:
    """``cls`` (a redis-py asyncio connection class: TCP, TLS or unix socket) packing with hiredis."""
    if cls not in _PACKING:
        _PACKING[cls] = type(f"Hiredis{cls.__name__}", (_HiredisPacking, cls), {})
    return _PACKING[cls]


class RedisMaterialization(Materialization):
    """Keeps Redis keys (and streams) in step with the bindings' collections."""

    config: RedisConfig

    async def open(self) -> None:
        self._where = self.config.where()
        self._bindings = [self._compile(b.source, b.parsed) for b in self.spec.bindings]
        prefix = self.config.advanced.state_prefix
        self._checkpoint_key = f"{prefix}checkpoint:{self.ctx.name}"
        self._fence_key = f"{prefix}fence:{self.ctx.name}"
        self._pos_prefix = f"{prefix}pos:"
        self._binding_args: list[Any] = [len(self._bindings)]
        for b in self._bindings:
            self._binding_args += [b.mode, b.ttl_ms, b.stream, b.maxlen]
        self._tokens: dict[TopicPartition, int] = {}
        self._expected: dict[TopicPartition, int | None] = {}
        self._next_verify = 0.0
        self._inflight = InFlight()
        # Assignment (called by the consumer's rebalance) and apply never interleave, so a batch
        # is always written under the fences it was read under.
        self._lock = asyncio.Lock()
        self._redis = client(self.config)
        try:
            await self._load_script()
        except (AuthenticationError, AuthorizationError) as e:
            await self._redis.aclose()
            raise self._auth_error(e) from e
        except TRANSIENT as e:
            await self._redis.aclose()
            raise EndpointError(f"Redis at {self._where} is unreachable: {self._scrub(e)}; "
                                "the task retries with backoff") from e

    def _compile(self, collection: str, resource: RedisBinding) -> _Binding:
        key = self.task.collections[collection].key
        template = parse_template(resource.key or default_template(collection, key))
        ttl_ms = round(resource.ttl * 1000) if resource.ttl else 0
        return _Binding(collection, template, "h" if resource.value == "hash" else "j", ttl_ms,
                        resource.stream or "", resource.stream_maxlen)

    async def assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Bump each partition's fence and read its checkpoint, in one MULTI/EXEC."""
        tps = sorted(partitions)
        fields = [_field(tp) for tp in tps]
        async with self._lock:
            await self._inflight.settle()
            replies = await self._retrying("assign partitions", self._fence, fields)
            stored = replies[-1]
            out: dict[TopicPartition, int | None] = {}
            for tp, token, offset in zip(tps, replies[:-1], stored, strict=True):
                self._tokens[tp] = int(token)
                out[tp] = self._expected[tp] = int(offset) if offset is not None else None
            return out

    async def _fence(self, fields: list[str]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=True)
        for f in fields:
            pipe.hincrby(self._fence_key, f, 1)
        pipe.hmget(self._checkpoint_key, fields)
        return await pipe.execute()

    async def rewind(self, offsets: Offsets) -> Offsets:
        """Checkpoints set back past a gap, each under this worker's fence token."""
        out: Offsets = {}
        async with self._lock:
            await self._inflight.settle()
            for tp, offset in sorted(offsets.items()):
                token = self._tokens.get(tp)
                if token is None:
                    continue
                done = await self._retrying("rewind a stored offset past a gap", self._redis.eval, scripts.REWIND, 2,
                                            self._checkpoint_key, self._fence_key, _field(tp), token, offset)
                if done:
                    out[tp] = self._expected[tp] = offset
        return out

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        async with self._lock:  # the batch in flight still applies under its fences
            await self._inflight.settle()
            for tp in partitions:
                self._tokens.pop(tp, None)
                self._expected.pop(tp, None)

    async def apply(self, batch: Batch) -> Applied:
        async with self._lock:
            self._inflight.raise_failure()
            dead: list[tuple[_Binding, Record, str]] = []
            chunks = self._chunks(batch, dead)  # while the batch before it runs in Redis
            if not self.config.advanced.overlap:
                await self._send_dead(dead)
                return await self._write(chunks, batch.next_offsets(), len(dead))
            previous = await self._inflight.outcome()  # in order: its checkpoints are this batch's expected ones
            await self._send_dead(dead)
            self._inflight.start(self._write(chunks, batch.next_offsets(), len(dead)))
            return previous

    async def _write(self, chunks: list[_Chunk], offsets: Offsets, dead: int) -> Applied:
        written: dict[int, int] = {}
        pending = chunks
        while pending:
            replies = await self._retrying("apply a batch", self._execute, pending)
            settled = 0
            for chunk, reply in zip(pending, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    break  # Redis restarted or its script cache was flushed
                self._settle(chunk, reply, written)
                settled += 1
            pending = pending[settled:]
            if pending:
                await self._retrying("load the apply script", self._load_script)
        return Applied(offsets, documents=written, dead=dead)

    async def tick(self) -> Applied:
        """An empty poll: the batch in flight is reported; while no documents come, notice a Redis
        that lost its data (or a takeover) anyway."""
        async with self._lock:
            applied = await self._inflight.outcome()
            now = time.monotonic()
            if self._tokens and now >= self._next_verify:
                self._next_verify = now + VERIFY_EVERY
                tps = list(self._tokens)
                held = await self._retrying("check fences", self._redis.hmget, self._fence_key,
                                            [_field(tp) for tp in tps])
                for tp, h in zip(tps, held, strict=True):
                    if h is None or int(h) != self._tokens[tp]:
                        raise self._fence_error(tp, h)
            return applied

    def _fence_error(self, tp: TopicPartition, held: bytes | None) -> EndpointError | Fenced:
        """What it means that Redis holds ``held`` as the fence of ``tp``, not this worker's token."""
        if not held:
            return StateLost(f"Redis at {self._where} lost this task's fence for {_field(tp)} (restarted without "
                             "persistence, or the key was deleted); restarting to resume from the "
                             "checkpoint Redis holds")
        return Fenced(f"{_field(tp)} was taken over by another worker (its fence is {int(held)}, this worker "
                      f"holds {self._tokens[tp]}); this worker's batch is dropped and nothing of it was written")

    async def close(self, failed: bool) -> Applied:
        try:
            inflight = getattr(self, "_inflight", None)  # None: open() failed early
            if inflight is None or failed:
                if inflight is not None:
                    await inflight.drop()  # each script call is atomic: applied whole or not at all
                return Applied()
            async with self._lock:
                return await inflight.outcome()
        finally:
            redis = getattr(self, "_redis", None)
            if redis is not None:
                await redis.aclose()

    # ------------------------------------------------------------------ encoding

    def _chunks(self, batch: Batch, dead: list[tuple[_Binding, Record, str]]) -> list[_Chunk]:
        """Script arguments of the batch's documents; unmappable records go to ``dead`` (sent by the
        caller once the batch before is known to be applied: a failed one has this batch re-read)."""
        size = self.config.advanced.chunk_size
        bindings = self._bindings
        out: list[_Chunk] = []
        chunk = _Chunk()
        for r in batch.records:
            b = batch.bindings[r.topic]
            binding = bindings[b]
            chunk.parts[r.tp] = r.offset + 1
            doc = r.doc
            if r.error is not None or not isinstance(doc, dict):
                dead.append((binding, r, r.error or "the document is not a JSON object"))
                continue
            try:
                key = render(binding.template, doc)
            except LookupError as e:
                dead.append((binding, r, f"key template: {e}"))
                continue
            clock, offset = r.source
            c = chunk.clocks.get(clock)
            if c is None:
                c = chunk.clocks[clock] = len(chunk.clocks) + 1
            args = chunk.args
            args += (b + 1, c, offset, key)
            if binding.mode == "j":
                args.append(r.value)
            else:
                fields = hash_fields(doc)
                args.append(len(fields) // 2)
                args += fields
            if binding.stream and binding.mode == "h":
                args.append(r.value)  # the stream entry's `doc` (a JSON value is its own)
            chunk.docs[b] = chunk.docs.get(b, 0) + 1
            chunk.size += 1
            chunk.bytes += len(r.value) + len(key)
            if chunk.size >= size or chunk.bytes >= CHUNK_BYTES:
                out.append(chunk)
                chunk = _Chunk()
        if chunk.parts:
            out.append(chunk)
        return out

    async def _send_dead(self, dead: list[tuple[_Binding, Record, str]]) -> None:
        for binding, r, error in dead:
            await self.ctx.dead_letter(binding.collection, f"redis: {error}", r.value,
                                       partition=r.partition, offset=r.offset)

    def _header(self, chunk: _Chunk, expected: dict[TopicPartition, int | None]) -> list[Any]:
        head: list[Any] = [len(chunk.parts)]
        for tp, after in chunk.parts.items():
            token = self._tokens.get(tp)
            if token is None:
                raise Fenced(f"{_field(tp)} is no longer assigned to this worker; its batch is dropped "
                             "and re-read by the partition's new owner")
            before = expected.get(tp)
            head += [_field(tp), token, "" if before is None else before, after]
            expected[tp] = after
        return [*head, len(chunk.clocks), *chunk.clocks, *self._binding_args, self._pos_prefix]

    # ------------------------------------------------------------------ talking to Redis

    async def _execute(self, chunks: list[_Chunk]) -> list[Any]:
        expected = dict(self._expected)
        pipe = self._redis.pipeline(transaction=False)
        for chunk in chunks:
            pipe.evalsha(scripts.APPLY_SHA, 2, self._checkpoint_key, self._fence_key,
                         *self._header(chunk, expected), *chunk.args)
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, ReadOnlyError):
                raise reply  # a failover in progress: retry the chunks not yet settled
        return replies

    def _settle(self, chunk: _Chunk, reply: Any, written: dict[int, int]) -> None:
        """Account for one chunk's reply, or raise what it means."""
        if isinstance(reply, OutOfMemoryError):
            raise EndpointError(f"Redis at {self._where} is out of memory (maxmemory reached): storage quota "
                                "exceeded; raise maxmemory, shorten TTLs or evict, then the task resumes") from reply
        if isinstance(reply, ResponseError):
            raise EndpointError(f"Redis at {self._where} refused a batch: {reply}") from reply
        code = reply[0]
        if code in (scripts.APPLIED, scripts.ALREADY_APPLIED):
            for tp, after in chunk.parts.items():
                self._expected[tp] = after
            if code == scripts.APPLIED:
                for binding, n in chunk.docs.items():
                    written[binding] = written.get(binding, 0) + n
            return
        where = reply[1].decode(errors="replace")
        seen = reply[2].decode(errors="replace")
        if code == scripts.FENCE:
            raise self._fence_error(next(tp for tp in chunk.parts if _field(tp) == where), reply[2])
        if code == scripts.CHECKPOINT_MOVED:
            raise StateLost(f"the checkpoint of {where} in Redis at {self._where} is {seen or 'gone'}, not where "
                            "this worker left it (Redis restarted from an older snapshot?); restarting to "
                            "resume from the checkpoint Redis holds")
        raise ConfigError(f"stream key {where!r} in Redis at {self._where} holds a {seen}, not a stream: "
                          "rename the binding's `stream` or delete that key", self.ctx.name)

    async def _load_script(self) -> None:
        sha = await self._redis.script_load(scripts.APPLY)
        if sha != scripts.APPLY_SHA:
            raise EndpointError(f"Redis at {self._where} answered SCRIPT LOAD with {sha}, "
                                f"expected {scripts.APPLY_SHA}: not a compatible Redis server")

    async def _retrying(self, what: str, op: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``op(*args)``, retried with backoff while Redis is unreachable (``advanced.retry``)."""
        attempts = self.config.advanced.retry.attempts(self.ctx.sleep)
        while True:
            try:
                return await op(*args)
            except (AuthenticationError, AuthorizationError) as e:
                raise self._auth_error(e) from e
            except TRANSIENT as e:
                self.ctx.report(EndpointError(f"Redis at {self._where}: cannot {what}: {self._scrub(e)}"))
                delay = attempts.delay()
                if delay is None:
                    raise EndpointError(f"Redis at {self._where}: cannot {what} after retrying for "
                                        f"{time.monotonic() - attempts.started:.0f}s: {self._scrub(e)}") from e
                if attempts.retries == 1:
                    self.ctx.log.warning("Redis at %s: cannot %s (%s); retrying with backoff", self._where,
                                         what, self._scrub(e))
                if not await attempts.sleep(delay):
                    raise EndpointError(f"Redis at {self._where}: stopped while unable to {what}; "
                                        "nothing of the batch is checkpointed, it is re-read") from e

    def _auth_error(self, e: BaseException) -> ConfigError:
        return ConfigError(f"Redis at {self._where} refused our credentials ({self._scrub(e)}): check "
                           "REDIS_PASSWORD, or the user and password in REDIS_URL", self.ctx.name)

    def _scrub(self, e: BaseException) -> str:
        return scrub(f"{type(e).__name__}: {e}", self.config.secrets())


# ---------------------------------------------------------------------------- values


def _text(value: Any) -> str:
    """A scalar as it reads in a key or hash field; objects and arrays as JSON."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    return orjson.dumps(value).decode()


def render(template: Template, doc: dict[str, Any]) -> str:
    """The key of ``doc``; LookupError naming the pointer when the document lacks it."""
    out = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        node = resolve(doc, part)
        if node is MISSING:
            raise LookupError(f"the document has no /{'/'.join(part)}")
        out.append(_text(node))
    return "".join(out)


def hash_fields(doc: dict[str, Any]) -> list[str]:
    """HSET arguments: one field per top-level property."""
    out: list[str] = []
    for k, v in doc.items():
        out += (k, _text(v))
    return out


def _field(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


# ---------------------------------------------------------------------------- doctor


async def doctor(config: RedisConfig) -> list[Check]:
    """PING and INFO server; the password is never shown, whatever the error says."""
    name = f"redis {config.where()}"
    redis = client(config)
    try:
        async with asyncio.timeout(config.advanced.connect_timeout + 5):
            await redis.ping()
            info = await redis.info("server")
    except (AuthenticationError, AuthorizationError):
        return [Check(name, False, "authentication failed: check REDIS_PASSWORD or the password in REDIS_URL "
                                   "(not shown)")]
    except (RedisError, OSError, TimeoutError) as e:
        return [Check(name, False, "unreachable: " + scrub(f"{type(e).__name__}: {e}", config.secrets()))]
    finally:
        await redis.aclose()
    mode = info.get("redis_mode", "standalone")
    detail = f"PING ok; Redis {info.get('redis_version', '?')} ({mode}), up {info.get('uptime_in_seconds', '?')}s"
    if mode == "cluster":
        return [Check(name, False, detail + "; Redis Cluster is not supported (the apply script spans keys "
                                            "of many slots): use a standalone server or a primary")]
    return [Check(name, True, detail)]
