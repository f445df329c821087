"""The postgres materialization: exactly-once upserts (or appends), fenced against zombie workers.

One batch is one transaction: read the batch's checkpoints (``localflow_checkpoints``), COPY
the documents into the session's load table, merge them into each binding's table, advance
the checkpoints only ``WHERE fence = <ours>``, commit. If another worker bumped a fence (it
was assigned the partition after a rebalance, or this worker was paused), the guarded UPDATE
matches nothing, the transaction rolls back and ``Fenced`` is raised: no row of the batch is
applied. Records below the stored next offset are skipped, so a batch retried after a commit
whose outcome was unknown is never applied twice (`localflow replay` alone re-applies them).

Fences order workers of this materialization; the order of a key's versions comes from their
source. Each row keeps the source position of its document (``flow_source``,
``flow_source_offset``: a derived document's ``localflow-source``, else its own record's), and an
upsert replaces a row only with a document newer in the same clock (topic and partition), so a
stalled derivation worker's late outputs, written to the topic after newer ones, never make a
row older. Within a batch the same rule picks each key's document before the load.

The checkpoint rows are locked only by that last UPDATE (the fence check at the start is a
plain read), so a worker paused mid-batch blocks nobody: the worker that takes over bumps the
fences at once. A worker paused inside the final UPDATE..COMMIT window does hold those locks,
until Postgres ends its idle transaction (``advanced.idle_in_transaction_timeout``).

Overlap (``advanced.overlap``, on by default): a batch is loaded (BEGIN, checkpoints read, COPY)
on a second connection while Postgres still merges the one before it; its merge, checkpoint
update and COMMIT wait until that one committed, so commits stay in order per partition and each
is still one fenced transaction. ``apply`` returns once the *previous* batch committed and says
that one is durable; the last is reported by ``tick`` (an empty poll), ``close`` or the next
``apply``. A rebalance, ``rewind`` and ``close`` first wait for the batch in flight; if it fails,
the batch loaded behind it is rolled back and the error is raised by the next call.

Batch size adapts to load by itself: the runtime hands over whatever one ``getmany`` returned
(one document when idle, up to ``max_records`` when behind) and nothing here waits to fill a
batch; writing a batch costs a few round trips whatever its size, so large batches are cheap.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import TypeVar

import asyncpg

from pipeline.sdk.context import ConnectorTask, Context
from pipeline.sdk.errors import ConfigError, EndpointError, Fenced, scrub
from pipeline.sdk.inflight import InFlight
from pipeline.sdk.materialization import Applied, Batch, Materialization, Offsets
from pipeline.sdk.records import Record, TopicPartition

from . import sql
from .config import PostgresConfig

T = TypeVar("T")

REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)
"""Errors that a row's values cause (a number out of range, NUL in text, a key too large to index)."""

TRANSIENT = (
    asyncpg.PostgresConnectionError,  # connection lost or refused by the server
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up, statement cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    OSError,
    TimeoutError,
)
"""Errors after which the same work may succeed later (Postgres down, restarting, overloaded)."""


def _jsonb_binary(value: bytes) -> bytes:
    """jsonb's binary wire format is a version byte and the JSON text: Kafka's bytes go as they are."""
    return b"\x01" + value


class PostgresMaterialization(Materialization):
    """Keeps one table per binding in step with its collection, exactly once."""

    config: PostgresConfig

    def __init__(self, ctx: Context, task: ConnectorTask) -> None:
        super().__init__(ctx, task)
        self._pool: asyncpg.Pool | None = None
        self._tables: list[sql.Table] = []
        self._merges: list[list[str]] = []
        self._unique_merges: list[list[str]] = []
        self._partitions: list[set[str]] = []
        self._fences: dict[TopicPartition, int] = {}
        self._revoked: set[TopicPartition] = set()
        self._lock = asyncio.Lock()  # a rebalance's fencing never interleaves with a batch
        self._holder = f"{socket.gethostname()}:{os.getpid()}"
        self._inflight = InFlight()
        """The batch loaded or merging in the background (``advanced.overlap``)."""

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        cfg = self.config
        sources = self.task.collections
        self._tables = [sql.table_of(sources[b.source].schema, sources[b.source].key, b.parsed, cfg.schema_)
                        for b in self.spec.bindings]
        self._merges = [sql.merge(t, i) for i, t in enumerate(self._tables)]
        self._unique_merges = [sql.merge(t, i, unique=True) for i, t in enumerate(self._tables)]
        settings = {
            "application_name": f"localflow {self.ctx.name} {os.getpid()}"[:63],
            "idle_in_transaction_session_timeout": str(int(cfg.advanced.idle_in_transaction_timeout * 1000)),
            "work_mem": cfg.advanced.work_mem,
        }
        try:
            # min_size=0: nothing connects here, so a database that is down is retried like any outage.
            self._pool = await asyncpg.create_pool(**cfg.connect_options(), min_size=0, max_size=cfg.pool_size,
                                                   init=self._init_connection, server_settings=settings)
        except Exception as e:  # noqa: BLE001 - reported without the DSN, which may hold the password
            raise EndpointError(f"Postgres at {cfg.where()}: bad connection settings: "
                                f"{type(e).__name__}: {scrub(str(e), cfg.secrets())}") from None
        self._partitions = await self._retry("create the schema and tables", self._prepare)
        self.ctx.log.info("tables ready in %s: %s", cfg.where(), ", ".join(t.qualified for t in self._tables))

    async def close(self, failed: bool) -> Applied:
        try:
            if failed:
                await self._inflight.drop()  # rolled back, as a crash would
                return Applied()
            async with self._lock:
                return await self._inflight.outcome()
        finally:
            pool, self._pool = self._pool, None
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=10)
                except TimeoutError:
                    pool.terminate()

    @staticmethod
    async def _init_connection(conn: asyncpg.Connection) -> None:
        await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                                  encoder=_jsonb_binary, decoder=lambda b: b[1:])
        await conn.execute(sql.create_load_table())

    async def _prepare(self, conn: asyncpg.Connection) -> list[set[str]]:
        """Create or migrate everything the bindings need; returns existing partitions per binding."""
        schema = self.config.schema_
        async with conn.transaction():
            # Workers of one materialization open together: serialize their DDL.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"localflow:{schema}")
            if await conn.fetchval("SELECT to_regnamespace($1)", sql.ident(schema)) is None:
                await conn.execute(f"CREATE SCHEMA {sql.ident(schema)}")
            await conn.execute(sql.create_checkpoints(schema))
            statements: list[str] = []
            problems: list[tuple[str, str]] = []
            for i, table in enumerate(self._tables):
                existing = await _existing(conn, table)
                if existing is None:
                    statements.append(sql.create_table(table))
                else:
                    migration, conflicts = sql.migrate(table, existing)
                    statements += migration
                    problems += [(f"materializations.{self.ctx.name}.bindings[{i}]", c + ": migrate the table "
                                  "yourself, or materialize into a new table") for c in conflicts]
                statements += sql.create_indexes(table)
            if problems:
                raise ConfigError(problems)
            for statement in statements:
                await conn.execute(statement)
            return [await _partitions_of(conn, table) for table in self._tables]

    # ------------------------------------------------------------------ partitions

    async def assigned(self, partitions: set[TopicPartition]) -> dict[TopicPartition, int | None]:
        tps = sorted(partitions)
        async with self._lock:
            await self._inflight.settle()
            if self._pool is None:  # a rebalance that arrives while the task closes fences nothing
                raise EndpointError("partitions assigned after the postgres materialization was closed")
            rows = await self._retry("fence assigned partitions", lambda conn: conn.fetch(
                sql.fence(self.config.schema_), self.ctx.name, [tp.topic for tp in tps],
                [tp.partition for tp in tps], self._holder))
            out: dict[TopicPartition, int | None] = {}
            for topic, partition, next_offset, fence in rows:
                tp = TopicPartition(topic, partition)
                self._fences[tp] = fence
                self._revoked.discard(tp)
                out[tp] = next_offset
            return out

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        async with self._lock:  # waits for the batch in flight, which may still commit with its fence
            await self._inflight.settle()
            for tp in partitions:
                self._fences.pop(tp, None)
            self._revoked |= partitions

    # ------------------------------------------------------------------ batches

    async def apply(self, batch: Batch) -> Applied:
        async with self._lock:
            self._inflight.raise_failure()
            tps = {r.tp for r in batch.records}
            if tps & self._revoked:
                # Fetched before a rebalance moved these partitions away: their new owner reads them
                # again from the stored offsets.
                batch = Batch([r for r in batch.records if r.tp not in self._revoked], batch.bindings, batch.reapply)
                tps -= self._revoked
            unfenced = sorted(tp for tp in tps if tp not in self._fences)
            if unfenced:
                raise EndpointError(f"records of {', '.join(f'{t.topic}[{t.partition}]' for t in unfenced)} arrived "
                                    "without a fence for them (fencing failed at assignment); the task restarts "
                                    "and fences again")
            if not batch.records:
                return self._inflight.take()
            fences = {tp: self._fences[tp] for tp in tps}
            await self._ensure_partitions(batch)
            if not self.config.advanced.overlap:
                return await self._retry("apply a batch", lambda conn: self._apply(conn, batch, fences))
            previous = self._inflight.task
            self._inflight.start(self._retry("apply a batch", lambda conn: self._apply(conn, batch, fences, previous)))
            return await self._inflight.outcome_of(previous)

    async def tick(self) -> Applied:
        """An empty poll: the batch in flight is waited for and reported."""
        async with self._lock:
            return await self._inflight.outcome()

    async def rewind(self, offsets: Offsets) -> Offsets:
        """Stored offsets set back past a gap, under this worker's fences (the zombie guard of commits)."""
        async with self._lock:
            await self._inflight.settle()
            order = sorted(tp for tp in offsets if tp in self._fences)
            if not order:
                return {}
            name, schema = self.ctx.name, self.config.schema_

            async def commit(conn: asyncpg.Connection) -> Offsets:
                rows = await conn.fetch(sql.commit_checkpoints(schema), name, [tp.topic for tp in order],
                                        [tp.partition for tp in order], [self._fences[tp] for tp in order],
                                        [offsets[tp] for tp in order])
                done = {TopicPartition(t, p) for t, p in rows}
                return {tp: offsets[tp] for tp in order if tp in done}

            return await self._retry("rewind stored offsets past a gap", commit)

    async def _apply(self, conn: asyncpg.Connection, batch: Batch, fences: dict[TopicPartition, int],
                     previous: asyncio.Task[Applied] | None = None) -> Applied:
        """One batch, one transaction. With ``previous`` (the batch before it, still in flight), the
        load runs at once and the merge waits for that one's COMMIT."""
        name, schema = self.ctx.name, self.config.schema_

        async def committed_before() -> None:
            if previous is None:
                return
            if not previous.done():
                await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                raise _Dropped("the batch before it failed; this one was rolled back")

        tps = sorted(fences)
        topics, parts = [tp.topic for tp in tps], [tp.partition for tp in tps]
        async with conn.transaction():
            stored = {TopicPartition(t, p): (n or 0, f)
                      for t, p, n, f in await conn.fetch(sql.read_checkpoints(schema), name, topics, parts)}
            for tp in tps:
                current = stored.get(tp, (0, None))[1]
                if current != fences[tp]:
                    raise Fenced(f"{tp.topic}[{tp.partition}]: another worker took this partition over (fence "
                                 f"{current}, this worker holds {fences[tp]}); its batch for it was not applied")
            # Skip what a previous attempt already committed (its commit reply may have been lost),
            # except where `localflow replay` asks to re-apply from an earlier offset on purpose.
            replaying = batch.reapply
            floors = {(tp.topic, tp.partition): 0 if tp in replaying else n for tp, (n, _) in stored.items()}
            dead: list[tuple[Record, str | None]] = []
            valid: list[tuple[int, Record]] = []
            seq = 0
            for r in batch.records:  # one pass, per record: the hot loop of every batch
                if r.offset < floors.get((r.topic, r.partition), 0):
                    continue
                error = r.error
                if error is None:
                    valid.append((seq, r))
                else:
                    dead.append((r, error))
                seq += 1
            items = self._newest(valid, batch.bindings)
            unique = all(r.key is not None for _, r in items)  # then ``_newest`` left one row per key
            dead += await self._write(conn, batch.bindings, items, committed_before, unique)
            await committed_before()
            ends = {tp: n for tp, n in batch.next_offsets().items() if n > stored[tp][0] or tp in replaying}
            if ends:
                order = sorted(ends)
                committed = await conn.fetch(sql.commit_checkpoints(schema), name, [tp.topic for tp in order],
                                             [tp.partition for tp in order], [fences[tp] for tp in order],
                                             [ends[tp] for tp in order])
                lost = set(order) - {TopicPartition(t, p) for t, p in committed}
                if lost:
                    raise Fenced(", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(lost)) + ": another "
                                 "worker took over while the batch was written (its fence is newer than this "
                                 "worker's); nothing of the batch was applied")
            for record, error in dead:  # before COMMIT: a crash here re-sends them, never loses them
                await self._dead_letter(batch, record, error or "")
        applied = Counter(batch.bindings[r.topic] for _, r in items)
        applied.subtract(batch.bindings[r.topic] for r, _ in dead if r.error is None)
        self.ctx.report(connected=True)
        return Applied(ends, documents=dict(applied), dead=len(dead))

    def _newest(self, items: list[tuple[int, Record]], bindings: dict[str, int]) -> list[tuple[int, Record]]:
        """Per key of an upsert table, the document the upsert's rule keeps when applied in order.

        A later document replaces an earlier one of its key unless both have one source clock and
        the later is not newer in it (a stalled derivation worker's late output). Keys are the
        Kafka message keys (the collection key as a JSON array); a record without one stays.
        """
        keep: dict[tuple[int, bytes], int] = {}
        dropped: set[int] = set()
        for j, (_, r) in enumerate(items):
            binding = bindings[r.topic]
            if r.key is None or self._tables[binding].delta:
                continue
            held = keep.get((binding, r.key))
            if held is not None:  # positions are read only for a key seen twice (rare, and not free)
                (clock, offset), (new_clock, new_offset) = items[held][1].source, r.source
                if clock == new_clock and offset >= new_offset:
                    dropped.add(j)
                    continue
                dropped.add(held)
            keep[(binding, r.key)] = j
        return [item for j, item in enumerate(items) if j not in dropped] if dropped else items

    async def _write(self, conn: asyncpg.Connection, bindings: dict[str, int], items: list[tuple[int, Record]],
                     before_merge: Callable[[], Awaitable[None]], unique: bool = False) -> list[tuple[Record, str]]:
        """Load and merge ``items``; on a refused row, split in halves to find it. Returns the refused.

        Halves are applied in order inside savepoints, so the last document per key still wins.
        """
        if not items:
            return []
        try:
            async with conn.transaction():  # a savepoint: a refused row undoes only this attempt
                await conn.copy_records_to_table(
                    sql.LOAD, columns=sql.LOAD_COLUMNS,
                    records=[(bindings[r.topic], seq, r.timestamp_ms, r.value, *r.source) for seq, r in items])
                await before_merge()
                lo, hi = items[0][0], items[-1][0] + 1
                merges = self._unique_merges if unique else self._merges
                for binding in sorted({bindings[r.topic] for _, r in items}):
                    for statement in merges[binding]:
                        await conn.execute(statement, lo, hi)
            return []
        except asyncpg.CardinalityViolationError:
            if not unique:
                raise
            return await self._write(conn, bindings, items, before_merge)  # two Kafka keys, one table key
        except REFUSED as e:
            if len(items) == 1:
                table = self._tables[bindings[items[0][1].topic]]
                detail = f" ({e.detail})" if getattr(e, "detail", None) else ""
                return [(items[0][1], f"Postgres refused the document for {table.qualified}: "
                                      f"{e.sqlstate} {e}{detail}")]
        mid = len(items) // 2
        return (await self._write(conn, bindings, items[:mid], before_merge, unique)
                + await self._write(conn, bindings, items[mid:], before_merge, unique))

    async def _dead_letter(self, batch: Batch, record: Record, error: str) -> None:
        binding = batch.bindings[record.topic]
        self.ctx.log.warning("dead letter from %s[%d]@%d: %s", record.topic, record.partition, record.offset, error)
        await self.ctx.dead_letter(self.spec.bindings[binding].source, error, record.value,
                                   reason="rejected" if record.error is None else "invalid",
                                   table=self._tables[binding].qualified, topic=record.topic,
                                   partition=record.partition, offset=record.offset)

    async def _ensure_partitions(self, batch: Batch) -> None:
        """Create the periods the batch's rows (and the coming ``ahead`` periods) fall in, if missing."""
        needed: dict[int, set[date]] = {}
        today = datetime.now(UTC).date()
        for i, table in enumerate(self._tables):
            if table.partition is None:
                continue
            column = table.partition.column
            values = [r.doc.get(column) for r in batch.records
                      if batch.bindings.get(r.topic) == i and isinstance(r.doc, dict)]
            periods = sql.periods_for(values, table.partition.interval)
            periods |= sql.periods_ahead(today, table.partition.interval, table.partition.ahead)
            missing = {p for p in periods
                       if sql.partition_name(table, p, table.partition.interval) not in self._partitions[i]}
            if missing:
                needed[i] = missing
        if not needed:
            return

        async def create(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"localflow:{self.config.schema_}")
                for i, periods in needed.items():
                    for start in sorted(periods):
                        await conn.execute(sql.create_partition(self._tables[i], start))

        await self._retry("create partitions", create)
        for i, periods in needed.items():
            table = self._tables[i]
            assert table.partition is not None
            self._partitions[i] |= {sql.partition_name(table, p, table.partition.interval) for p in periods}

    # ------------------------------------------------------------------ retries

    async def _retry(self, what: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection; while Postgres is unreachable, retry with backoff.

        The task stays up through restarts and outages of the database (nothing is lost: a
        batch is applied whole or not at all). Only a stop request ends the retries.
        """
        assert self._pool is not None, "open() first"
        cfg = self.config
        attempts = cfg.advanced.retry.attempts(self.ctx.sleep)
        while True:
            try:
                async with self._pool.acquire() as conn:
                    return await work(conn)
            except (Fenced, ConfigError, EndpointError):
                raise
            except Exception as e:
                message = f"{type(e).__name__}: {scrub(str(e), cfg.secrets())}"
                if not isinstance(e, TRANSIENT):
                    error = EndpointError(f"Postgres at {cfg.where()}: cannot {what}: {message}")
                    # Server-reported errors are safe to chain; client-side ones may quote the DSN.
                    raise error from (e if isinstance(e, asyncpg.PostgresError) else None)
                self.ctx.report(connected=False)
                delay = attempts.delay()
                if delay is None:
                    raise EndpointError(f"Postgres at {cfg.where()}: cannot {what} after {attempts.retries + 1} "
                                        f"attempts: {message}; nothing was applied") from None
                self.ctx.log.warning("Postgres at %s: cannot %s (%s); retrying in %.1fs",
                                     cfg.where(), what, message, delay)
                if not await attempts.sleep(delay):
                    raise EndpointError(f"Postgres at {cfg.where()}: cannot {what} and the task is stopping: "
                                        f"{message}; nothing was applied, the next run resumes from the "
                                        "checkpoint") from None


class _Dropped(EndpointError):
    """A batch loaded behind one that failed: rolled back, never retried (the failure is what counts)."""


async def _existing(conn: asyncpg.Connection, table: sql.Table) -> sql.Existing | None:
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table.qualified)
    if oid is None:
        return None
    columns = await conn.fetch("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                               "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum", oid)
    primary_key = await conn.fetch(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = $1 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)", oid)
    partition = await conn.fetch(
        "SELECT a.attname FROM pg_partitioned_table p "
        "JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = ANY(p.partattrs::int2[]) "
        "WHERE p.partrelid = $1", oid)
    partitioned = await conn.fetchval("SELECT relkind = 'p' FROM pg_class WHERE oid = $1", oid)
    return sql.Existing(columns={r[0]: r[1] for r in columns}, primary_key=[r[0] for r in primary_key],
                        partition_column=partition[0][0] if partition else None, partitioned=partitioned)


async def _partitions_of(conn: asyncpg.Connection, table: sql.Table) -> set[str]:
    if table.partition is None:
        return set()
    rows = await conn.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                            "WHERE i.inhparent = to_regclass($1)", table.qualified)
    return {r[0] for r in rows}


