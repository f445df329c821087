"""The postgres materialization against a real PostgreSQL and a real broker.

What a user sees: the tables and their columns, the rows (last document per key, or every
document in delta mode), `localflow_checkpoints` at the end of each topic, dead letters, and
error messages. Fault injection (kill -9, SIGSTOP of a worker, a Postgres restart) runs the
workers as their own processes (tests/support/workers.py) or against private servers.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from connectors.postgres.config import PostgresConfig
from pipeline.embedded.services import free_port
from pipeline.runtime.catalog import Catalog, load_catalog
from pipeline.runtime.collection import Collection, CollectionWriter, read_to_end
from pipeline.runtime.registry import load_connector
from pipeline.runtime.task import STATUS, TaskContext
from pipeline.sdk.errors import ConfigError, EndpointError
from tests.support.tasks import running
from tests.support.waiting import wait_for_async
from tests.support.workers import READER, Worker, task_worker
from tests.support.writing import produce as write

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"reader": READER}

DOC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "seq": {"type": "integer"},
        "version": {"type": "integer"},
        "ts": {"type": "string", "format": "date-time"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "tags": {"type": "array"},
        "attrs": {"type": "object"},
        "note": {"type": "string"},
    },
    "required": ["id", "seq", "ts"],
}


def doc(key: str, seq: int, version: int = 0, ts: str = "2024-05-06T07:08:09Z", **extra: Any) -> dict[str, Any]:
    return {"id": key, "seq": seq, "version": version, "ts": ts, "score": seq / 4, "ok": seq % 2 == 0,
            "tags": ["a", seq], "attrs": {"n": seq}, **extra}


# -- a catalog per test ------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """One test's catalog file: collections of ``schema`` and one postgres materialization."""

    path: Path
    task: str
    pg_schema: str
    collections: tuple[str, ...]
    resources: tuple[dict[str, Any], ...]
    kafka: str
    postgres_url: str
    schema: dict[str, Any]
    partitions: int = 1
    advanced: dict[str, Any] | None = None

    def write(self) -> Catalog:
        endpoint: dict[str, Any] = {"url": self.postgres_url, "schema": self.pg_schema}
        if self.advanced:
            endpoint["advanced"] = self.advanced
        raw = {
            "kafka": {"bootstrap_servers": self.kafka},
            "collections": {c: {"schema": self.schema, "key": ["/id"], "partitions": self.partitions}
                            for c in self.collections},
            "materializations": {self.task: {"endpoint": {"postgres": endpoint}, "bindings": [
                {"source": c, "resource": r} for c, r in zip(self.collections, self.resources, strict=True)]}},
        }
        self.path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_catalog(self.path)

    @property
    def catalog(self) -> Catalog:
        return load_catalog(self.path)

    def collection(self, i: int = 0) -> Collection:
        return Collection.from_catalog(self.catalog, self.collections[i])

    def table(self, i: int = 0) -> str:
        return f'"{self.pg_schema}"."{self.resources[i]["table"]}"'

    @property
    def checkpoints(self) -> str:
        return f'"{self.pg_schema}".localflow_checkpoints'


@pytest.fixture
def make_flow(tmp_path: Path, kafka_bootstrap: str, postgres_url: str,
              unique_name: Callable[..., str]) -> Callable[..., Flow]:
    def make(*resources: dict[str, Any], partitions: int = 1, schema: dict[str, Any] = DOC_SCHEMA,
             advanced: dict[str, Any] | None = None, postgres: str | None = None) -> Flow:
        flow = Flow(tmp_path / f"{unique_name('flow')}.yaml", f"test/{unique_name()}", unique_name("s"),
                    tuple(f"test/{unique_name()}" for _ in resources), resources, kafka_bootstrap,
                    postgres or postgres_url, schema, partitions, advanced)
        flow.write()
        return flow

    return make


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_url)
    try:
        yield conn
    finally:
        await conn.close()


# -- helpers -------------------------------------------------------------------------------------


async def produce(flow: Flow, docs: list[dict[str, Any]], binding: int = 0) -> None:
    await write(flow.catalog, flow.collection(binding).name, docs)


async def create_topics(flow: Flow) -> None:
    async with CollectionWriter(flow.catalog.kafka, "test") as writer:
        await writer.ensure(flow.collection(i) for i in range(len(flow.collections)))


async def topic_end(flow: Flow, binding: int = 0) -> dict[int, int]:
    """Next offset of each partition: the fetch high watermark (right on Tansu, unlike end_offsets)."""
    consumer = AIOKafkaConsumer(flow.collection(binding).topic, bootstrap_servers=flow.kafka, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while len(consumer.assignment()) < flow.partitions or any(
                    consumer.highwater(tp) is None for tp in consumer.assignment()):
                await consumer.getmany(timeout_ms=200, max_records=1)
        return {tp.partition: consumer.highwater(tp) for tp in consumer.assignment()}
    finally:
        await consumer.stop()


async def checkpoints(pg: asyncpg.Connection, flow: Flow, binding: int = 0) -> dict[int, asyncpg.Record]:
    try:
        rows = await pg.fetch(f"SELECT partition, next_offset, fence, holder FROM {flow.checkpoints} "
                              "WHERE materialization = $1 AND topic = $2", flow.task, flow.collection(binding).topic)
    except asyncpg.UndefinedTableError:
        return {}
    return {r["partition"]: r for r in rows}


async def wait_caught_up(pg: asyncpg.Connection, flow: Flow, end: dict[int, int], binding: int = 0,
                         within: float = 60) -> None:
    async def caught_up() -> bool:
        now = {p: r["next_offset"] for p, r in (await checkpoints(pg, flow, binding)).items()}
        return all((now.get(p) or 0) >= o for p, o in end.items())

    status = STATUS.get(flow.task)
    await wait_for_async(caught_up, timeout=within, message=f"checkpoints of {flow.task} at {end} "
                         f"(last task error: {status.last_error if status else None})")


async def rows_by_key(pg: asyncpg.Connection, flow: Flow, binding: int = 0) -> dict[str, dict[str, Any]]:
    rows = await pg.fetch(f"SELECT id, flow_document FROM {flow.table(binding)}")
    return {r["id"]: orjson.loads(r["flow_document"]) for r in rows}


def last_per_key(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in docs}


def holder(proc: Worker) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


# -- tables from schemas -------------------------------------------------------------------------


async def test_sophia_tables_are_created_as_specified(pg: asyncpg.Connection, postgres_url: str,
                                                      unique_name: Callable[..., str]) -> None:
    database = unique_name("db")
    await pg.execute(f'CREATE DATABASE "{database}"')
    url = urllib.parse.urlsplit(postgres_url)._replace(path=f"/{database}").geturl()
    catalog = load_catalog(ROOT / "examples/sophia/flow.yaml", env={"POSTGRES_URL": url})
    ctx = TaskContext(catalog, "sophia/postgres", "materialization")
    m = load_connector("postgres").build(*ctx.for_connector())
    await m.open()
    await m.close(False)

    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch("SELECT table_name, column_name, data_type, is_nullable "
                                   "FROM information_schema.columns WHERE table_schema = 'estuary' "
                                   "ORDER BY table_name, ordinal_position")
        keys = await conn.fetch(
            "SELECT tc.table_name, k.column_name FROM information_schema.table_constraints tc "
            "JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name) "
            "WHERE tc.table_schema = 'estuary' AND tc.constraint_type = 'PRIMARY KEY'")
        indexes = await conn.fetch("SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'estuary'")
    finally:
        await conn.close()
    tables: dict[str, list[tuple[str, str, str]]] = {}
    for r in columns:
        tables.setdefault(r["table_name"], []).append((r["column_name"], r["data_type"], r["is_nullable"]))
    tstz = "timestamp with time zone"
    flow = [("flow_published_at", tstz, "NO"), ("flow_document", "jsonb", "NO"),
            ("flow_source", "text", "YES"), ("flow_source_offset", "bigint", "YES")]
    raw = [("metadata/id", "text", "NO"), ("timestamp", tstz, "YES"), ("source", "text", "YES"),
           ("data", "jsonb", "YES"), ("metadata", "jsonb", "YES"), *flow]
    assert tables == {
        "sophia_processed_data": [
            ("id", "text", "NO"), ("timestamp", tstz, "YES"), ("source", "text", "YES"),
            ("processed_data", "jsonb", "YES"), ("enrichments", "jsonb", "YES"),
            ("confidence_score", "double precision", "YES"), *flow],
        "sophia_agent_logs": raw,
        "sophia_metrics": raw,
        "localflow_checkpoints": [
            ("materialization", "text", "NO"), ("topic", "text", "NO"), ("partition", "integer", "NO"),
            ("next_offset", "bigint", "YES"), ("fence", "bigint", "NO"), ("holder", "text", "YES")],
    }
    assert {(r["table_name"], r["column_name"]) for r in keys} >= {
        ("sophia_processed_data", "id"), ("sophia_agent_logs", "metadata/id"), ("sophia_metrics", "metadata/id")}
    timestamp_indexes = {r["tablename"] for r in indexes if r["indexdef"].endswith('("timestamp")')}
    assert timestamp_indexes == {"sophia_processed_data", "sophia_agent_logs", "sophia_metrics"}


async def test_upsert_keeps_last_document_per_key_with_typed_columns(pg: asyncpg.Connection,
                                                                      make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "docs"}, partitions=2)
    docs = [doc(f"k{i % 50}", seq=i, version=i // 50) for i in range(500)]
    before = datetime.now(UTC)
    await produce(flow, docs)
    after = datetime.now(UTC)
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))

    expected = last_per_key(docs)
    assert await rows_by_key(pg, flow) == expected
    row = await pg.fetchrow(f"SELECT * FROM {flow.table()} WHERE id = 'k7'")
    last = expected["k7"]
    assert (row["seq"], row["version"], row["score"], row["ok"]) == (last["seq"], 9, last["score"], last["ok"])
    assert row["ts"] == datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert orjson.loads(row["tags"]) == last["tags"] and orjson.loads(row["attrs"]) == last["attrs"]
    assert before.replace(microsecond=0) <= row["flow_published_at"] <= after


async def test_two_kafka_keys_of_one_row_in_a_batch_keep_the_last_document(pg: asyncpg.Connection,
                                                                           make_flow: Callable[..., Flow]) -> None:
    # Another producer's keys need not be spelled as localflow's writer spells them: two spellings
    # of one key in one batch must still upsert one row, the later document winning.
    flow = make_flow({"table": "docs"})
    await create_topics(flow)
    producer = AIOKafkaProducer(bootstrap_servers=flow.kafka)
    await producer.start()
    try:
        for id_, key, version in (("k", b'["k"]', 1), ("k", b'[ "k" ]', 2), ("j", b'["j"]', 1)):
            await producer.send_and_wait(flow.collection().topic, orjson.dumps(doc(id_, 1, version)), key=key,
                                         partition=0)
    finally:
        await producer.stop()
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))
    assert {k: d["version"] for k, d in (await rows_by_key(pg, flow)).items()} == {"k": 2, "j": 1}


async def test_a_derived_document_older_at_its_source_never_replaces_a_newer_row(
        pg: asyncpg.Connection, make_flow: Callable[..., Flow]) -> None:
    # A stalled derivation worker writes its k v1 after the takeover's v2 (a higher offset of the
    # derived topic, an older source position): in the same batch, and in a later one. In the
    # partitioned table the late v1 would also move the row back to another month.
    flow = make_flow({"table": "plain"}, {"table": "monthly", "partition_by": {"column": "ts", "interval": "month"}})
    v1, v2 = doc("k", 1, ts="2024-05-06T07:08:09Z"), doc("k", 2, ts="2024-06-06T07:08:09Z")
    rounds = [[(v1, b"raw:0:10"), (v2, b"raw:0:11"), (v1, b"raw:0:10")],
              [(v1, b"raw:0:10"), (doc("j", 1), b"raw:1:3"), (doc("j", 2), b"raw:1:2")]]
    async with CollectionWriter(flow.catalog.kafka, "test") as writer, running(flow.catalog, flow.task, options=OPTIONS):
        for docs in rounds:
            for binding in range(2):
                await writer.write(flow.collection(binding), [d for d, _ in docs], positions=[p for _, p in docs])
            for binding in range(2):
                await wait_caught_up(pg, flow, await topic_end(flow, binding), binding)

    for binding in range(2):
        rows = await pg.fetch(f"SELECT * FROM {flow.table(binding)} ORDER BY id")
        assert [(r["id"], r["seq"]) for r in rows] == [("j", 1), ("k", 2)], flow.table(binding)
        assert [(r["flow_source"], r["flow_source_offset"]) for r in rows] == [("raw:1", 3), ("raw:0", 11)]


async def test_delta_updates_append_every_document(pg: asyncpg.Connection, make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "events", "delta_updates": True})
    docs = [doc(f"k{i % 10}", seq=i) for i in range(300)]
    await produce(flow, docs)
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))

    rows = await pg.fetch(f"SELECT id, seq FROM {flow.table()} ORDER BY seq")
    assert [(r["id"], r["seq"]) for r in rows] == [(d["id"], d["seq"]) for d in docs]


async def test_property_added_to_the_schema_becomes_a_column(pg: asyncpg.Connection,
                                                             make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "docs"})
    await produce(flow, [doc("old", 1)])
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))

    schema = {**DOC_SCHEMA, "properties": {**DOC_SCHEMA["properties"], "level": {"type": "integer"}}}
    flow = replace(flow, schema=schema)
    flow.write()
    await produce(flow, [doc("new", 2, level=5)])
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))

    rows = await pg.fetch(f"SELECT id, level FROM {flow.table()} ORDER BY id")
    assert [(r["id"], r["level"]) for r in rows] == [("new", 5), ("old", None)]


async def test_incompatible_schema_change_names_table_column_and_types(make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "docs"})
    m = load_connector("postgres").build(*TaskContext(flow.catalog, flow.task, "materialization").for_connector())
    await m.open()
    await m.close(False)

    schema = {**DOC_SCHEMA, "properties": {**DOC_SCHEMA["properties"], "note": {"type": "integer"}}}
    catalog = replace(flow, schema=schema).write()
    m = load_connector("postgres").build(*TaskContext(catalog, flow.task, "materialization").for_connector())
    with pytest.raises(ConfigError) as error:
        await m.open()
    await m.close(True)
    message = str(error.value)
    assert f'table {flow.table()}: column "note" is text in Postgres but the collection schema now makes it bigint' \
        in message


async def test_partitioned_table_has_periods_ahead_and_for_old_data(pg: asyncpg.Connection,
                                                                    make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "events", "partition_by": {"column": "ts", "interval": "month", "ahead": 2}})
    now = datetime.now(UTC)
    docs = [doc("a", 1, ts="2021-03-15T10:00:00Z"), doc("b", 2, ts=now.isoformat()),
            doc("c", 3, ts="2021-03-31T23:30:00-05:00"),  # April in UTC
            doc("a", 4, ts="2022-07-01T00:00:00Z")]  # a document whose month changed moves its row
    await produce(flow, docs)
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))

    rows = await pg.fetch(f"SELECT id, seq, tableoid::regclass::text AS part FROM {flow.table()} ORDER BY id")
    months = [now.date().replace(day=1)]
    for _ in range(2):
        months.append(date(months[-1].year + months[-1].month // 12, months[-1].month % 12 + 1, 1))
    partition = f"{flow.pg_schema}.events_"
    assert [(r["id"], r["seq"], r["part"]) for r in rows] == [
        ("a", 4, partition + "2022_07"), ("b", 2, partition + now.strftime("%Y_%m")), ("c", 3, partition + "2021_04")]
    names = {r[0] for r in await pg.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        flow.table())}
    assert {"events_" + m.strftime("%Y_%m") for m in months} <= names
    assert {"events_2021_03", "events_2021_04", "events_2022_07"} <= names


async def test_indexes_of_the_binding_are_created(pg: asyncpg.Connection, make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "docs", "indexes": [
        "note", {"columns": ["attrs"], "method": "gin"}, {"columns": ["ts", "version"], "name": "by_time"}]})
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_for_async(lambda: pg.fetchval("SELECT to_regclass($1)", flow.table()),
                             message="the table is created")
    definitions = {r["indexname"]: r["indexdef"] for r in await pg.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", flow.pg_schema)}
    table = f"{flow.pg_schema}.docs"
    assert definitions["docs_note_idx"] == f"CREATE INDEX docs_note_idx ON {table} USING btree (note)"
    assert definitions["docs_attrs_idx"] == f"CREATE INDEX docs_attrs_idx ON {table} USING gin (attrs)"
    assert definitions["by_time"] == f"CREATE INDEX by_time ON {table} USING btree (ts, version)"


def test_validate_rejects_names_postgres_cannot_hold(tmp_path: Path) -> None:
    long_table = "t" * 64
    schema = {**DOC_SCHEMA, "properties": {**DOC_SCHEMA["properties"], "bad\x00name": {"type": "string"}}}
    raw = {
        "collections": {"test/c": {"schema": schema, "key": ["/id"]}},
        "materializations": {"test/pg": {"endpoint": {"postgres": {"schema": "estuary"}},
                                         "bindings": [{"source": "test/c", "resource": {"table": long_table}}]}},
    }
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert f"materializations.test/pg.bindings[0].resource.table: '{long_table}' is 64 bytes long" in err
    assert "Postgres identifiers hold at most 63 bytes" in err
    assert "'bad\\x00name' contains a NUL character" in err


# -- bad rows, outages ---------------------------------------------------------------------------


async def test_poison_document_is_dead_lettered_and_its_neighbours_applied(pg: asyncpg.Connection,
                                                                          make_flow: Callable[..., Flow]) -> None:
    flow = make_flow({"table": "docs"})
    docs = [doc(f"k{i}", seq=i) for i in range(40)]
    docs[11] = doc("too-big", seq=2**63)  # beyond bigint
    docs[29] = doc("nul", seq=29, note="a\x00b")  # jsonb cannot hold \u0000
    await produce(flow, docs)
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(pg, flow, await topic_end(flow))

    good = {d["id"]: d for d in docs if d["id"] not in ("too-big", "nul")}
    assert await rows_by_key(pg, flow) == good
    dead = await read_to_end(flow.catalog.kafka, flow.collection().dead_topic)
    letters = {orjson.loads(orjson.loads(r.value)["original"])["id"]: orjson.loads(r.value) for r in dead}
    assert set(letters) == {"too-big", "nul"}
    assert "bigint out of range" in letters["too-big"]["error"]
    assert "unsupported Unicode escape sequence" in letters["nul"]["error"]
    assert all(e["reason"] == "rejected" and e["task"] == flow.task for e in letters.values())
    assert letters["nul"]["offset"] == 29


async def test_postgres_restart_loses_nothing_and_the_task_stays_up(make_flow: Callable[..., Flow],
                                                                   fresh_services: Callable[..., Any]) -> None:
    services = fresh_services(postgres=True)
    flow = make_flow({"table": "docs"}, postgres=services.postgres.url)
    conn = await asyncpg.connect(services.postgres.url)
    first = [doc(f"k{i}", seq=i) for i in range(200)]
    await produce(flow, first)
    async with running(flow.catalog, flow.task, options=OPTIONS):
        await wait_caught_up(conn, flow, await topic_end(flow))
        await conn.close()
        services.postgres.kill()
        second = [doc(f"k{i}", seq=1000 + i, version=1) for i in range(100, 300)]
        await produce(flow, second)
        await wait_for_async(lambda: not STATUS[flow.task].connected, message="the task notices Postgres is down")
        services.postgres.start()
        conn = await asyncpg.connect(services.postgres.url)
        await wait_caught_up(conn, flow, await topic_end(flow))
        assert STATUS[flow.task].restarts == 0
        assert STATUS[flow.task].running
    try:
        assert await rows_by_key(conn, flow) == last_per_key(first + second)
    finally:
        await conn.close()


async def test_doctor_checks_connection_and_privileges_without_showing_the_password(
        pg: asyncpg.Connection, postgres_url: str, unique_name: Callable[..., str]) -> None:
    secret = "sw0rdfish-" + unique_name()
    role, schema = unique_name("r"), unique_name("s")
    await pg.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{secret}'")
    await pg.execute(f'CREATE SCHEMA "{schema}"')
    await pg.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')  # but not CREATE
    doctor = load_connector("postgres").doctor
    assert doctor is not None
    url = urllib.parse.urlsplit(postgres_url)

    owner = await doctor(PostgresConfig.model_validate({"url": postgres_url, "schema": schema}))
    limited = await doctor(PostgresConfig.model_validate({
        "url": url._replace(netloc=f"{role}:{secret}@{url.hostname}:{url.port}").geturl(), "schema": schema}))
    down = await doctor(PostgresConfig.model_validate({
        "host": "127.0.0.1", "port": free_port(), "user": role, "password": secret, "schema": schema}))

    assert [(c.name, c.ok) for c in owner] == [(owner[0].name, True), (f"postgres schema {schema}", True),
                                               ("postgres temporary tables", True)]
    assert limited[0].ok and f"connected as {role}" in limited[0].detail
    assert (limited[1].ok, limited[1].detail) == (False, "needs USAGE and CREATE on the schema "
                                                         "(GRANT USAGE, CREATE ON SCHEMA ...)")
    assert not down[0].ok and "cannot connect" in down[0].detail
    shown = " ".join(f"{c.name} {c.detail}" for c in owner + limited + down)
    assert secret not in shown and f"{role}@" in shown


async def test_errors_while_postgres_is_unreachable_never_show_the_password(
        make_flow: Callable[..., Flow], caplog: pytest.LogCaptureFixture) -> None:
    secret = "sw0rdfish-in-the-dsn"
    flow = make_flow({"table": "docs"}, postgres=f"postgresql://app:{secret}@127.0.0.1:{free_port()}/sophia")
    ctx = TaskContext(flow.catalog, flow.task, "materialization")
    m = load_connector("postgres").build(*ctx.for_connector())
    opening = asyncio.create_task(m.open())
    await wait_for_async(lambda: "retrying in" in caplog.text, message="a retry is logged")
    ctx.stopping.set()
    with pytest.raises(EndpointError) as error:
        await opening
    await m.close(True)
    assert str(error.value).startswith("Postgres at postgresql://app@127.0.0.1:")
    assert "cannot create the schema and tables and the task is stopping" in str(error.value)
    assert secret not in str(error.value) and secret not in caplog.text


# -- exactly once, with workers killed, paused and sharing partitions ----------------------------


async def kill_and_restart(pg: asyncpg.Connection, flow: Flow, log: Path, *, documents: int, keys: int,
                           kills: int) -> None:
    rng = random.Random()
    docs, versions = [], Counter[str]()
    for i in range(documents):
        key = f"k{rng.randrange(keys)}"
        versions[key] += 1
        docs.append({"id": key, "seq": i, "version": versions[key], "ts": "2024-05-06T07:08:09Z"})
    await produce(flow, docs)
    end = await topic_end(flow)

    async def progress() -> int:
        return sum(r["next_offset"] or 0 for r in (await checkpoints(pg, flow)).values())

    for _ in range(kills):
        # Each worker commits at least once (or holds every partition once all is applied) before
        # it is killed, so every kill hits a running worker.
        target = min(await progress() + rng.randint(1, documents // (kills + 1)), documents)

        async def worked(proc: Worker, target: int = target) -> bool:
            done = await progress()
            return done >= target and (done < documents or await all_held_by(pg, flow, holder(proc)))

        with task_worker(flow.path, flow.task, log, grace=0) as proc:
            await wait_for_async(lambda p=proc: worked(p), timeout=60,
                                 message=f"progress to {target} before kill -9\n{tail(log)}")
            await asyncio.sleep(rng.uniform(0, 0.15))  # fault injection: land the kill anywhere in a batch
            proc.kill()
    with task_worker(flow.path, flow.task, log, grace=0) as proc:
        await wait_for_async(lambda: all_held_by(pg, flow, holder(proc)), timeout=60,
                             message=f"the last worker holds every partition\n{tail(log)}")
        await wait_caught_up(pg, flow, end)
        assert proc.stop(timeout=30) == 0, tail(log)

    assert await rows_by_key(pg, flow) == last_per_key(docs)
    assert {p: r["next_offset"] for p, r in (await checkpoints(pg, flow)).items()} == end


async def test_kill_9_at_random_points_keeps_last_document_per_key_and_checkpoint_at_end(
        pg: asyncpg.Connection, make_flow: Callable[..., Flow], tmp_path: Path) -> None:
    flow = make_flow({"table": "docs"}, partitions=3)
    await kill_and_restart(pg, flow, tmp_path / "worker.log", documents=100_000, keys=10_000, kills=5)


@pytest.mark.chaos
@pytest.mark.timeout(900)
async def test_chaos_many_kills_keep_exactly_once(pg: asyncpg.Connection, make_flow: Callable[..., Flow],
                                                  tmp_path: Path) -> None:
    flow = make_flow({"table": "docs"}, partitions=4)
    await kill_and_restart(pg, flow, tmp_path / "worker.log", documents=300_000, keys=20_000, kills=25)


async def test_two_workers_share_partitions_and_apply_each_document_once(
        pg: asyncpg.Connection, make_flow: Callable[..., Flow], tmp_path: Path) -> None:
    flow = make_flow({"table": "events", "delta_updates": True}, partitions=4)
    await create_topics(flow)
    log = tmp_path / "workers.log"
    with task_worker(flow.path, flow.task, log, grace=0) as one, task_worker(flow.path, flow.task, log, grace=0) as two:
        async def both_hold_partitions() -> bool:
            holders = {r["holder"] for r in (await checkpoints(pg, flow)).values()}
            return holders == {holder(one), holder(two)}

        await wait_for_async(both_hold_partitions, timeout=60, message=f"both workers hold partitions\n{tail(log)}")
        docs = [doc(f"k{i % 1000}", seq=i) for i in range(40_000)]
        await produce(flow, docs)
        end = await topic_end(flow)
        await wait_caught_up(pg, flow, end)
        assert one.stop(timeout=30) == 0 and two.stop(timeout=30) == 0, tail(log)

    total, distinct = await pg.fetchrow(f"SELECT count(*), count(DISTINCT seq) FROM {flow.table()}")
    assert (total, distinct) == (len(docs), len(docs))
    applied_by = {r["holder"] for r in (await checkpoints(pg, flow)).values() if r["next_offset"]}
    assert applied_by == {holder(one), holder(two)}


async def test_worker_paused_past_a_rebalance_cannot_commit_the_partitions_it_lost(
        pg: asyncpg.Connection, make_flow: Callable[..., Flow], tmp_path: Path) -> None:
    flow = make_flow({"table": "events", "delta_updates": True}, partitions=4,
                     advanced={"idle_in_transaction_timeout": "5m"})
    await create_topics(flow)
    log_one, log_two = tmp_path / "one.log", tmp_path / "two.log"
    written = 0

    async def write(n: int) -> None:
        nonlocal written
        await produce(flow, [doc(f"k{i % 5000}", seq=i) for i in range(written, written + n)])
        written += n

    with task_worker(flow.path, flow.task, log_one, grace=0) as one:
        await wait_for_async(lambda: all_held_by(pg, flow, holder(one)), timeout=60,
                             message=f"worker one holds every partition\n{tail(log_one)}")
        # Pause worker one while it holds a batch mid-apply: inside a transaction that already wrote
        # (backend_xid set), before it locks its checkpoint rows for the final, fenced UPDATE.
        stale_batch = False
        for _ in range(20):
            await write(30_000)
            if await pause_mid_batch(pg, flow, one):
                stale_batch = True
                break
            one.resume()
        assert stale_batch, f"never caught worker one mid-batch\n{tail(log_one)}"
        fences = {p: r["fence"] for p, r in (await checkpoints(pg, flow)).items()}

        with task_worker(flow.path, flow.task, log_two, grace=0) as two:
            async def taken_over() -> bool:
                now = await checkpoints(pg, flow)
                return all(r["holder"] == holder(two) and r["fence"] > fences[p] for p, r in now.items())

            await wait_for_async(taken_over, timeout=60, message=f"worker two took every partition\n{tail(log_two)}")
            await wait_caught_up(pg, flow, await topic_end(flow))
            one.resume()
            await wait_for_async(lambda: "replaced by another worker" in log_one.read_text(), timeout=60,
                                 message=f"worker one reports it was replaced\n{tail(log_one)}")
            await write(1000)  # both workers run on, sharing the partitions again
            await wait_caught_up(pg, flow, await topic_end(flow))
            assert one.stop(timeout=30) == 0 and two.stop(timeout=30) == 0, tail(log_one) + tail(log_two)

    total, distinct = await pg.fetchrow(f"SELECT count(*), count(DISTINCT seq) FROM {flow.table()}")
    assert (total, distinct) == (written, written), "a document is missing or was applied twice"


async def all_held_by(pg: asyncpg.Connection, flow: Flow, who: str) -> bool:
    rows = await checkpoints(pg, flow)
    return len(rows) == flow.partitions and all(r["holder"] == who for r in rows.values())


async def pause_mid_batch(pg: asyncpg.Connection, flow: Flow, proc: Worker) -> bool:
    """SIGSTOP ``proc`` while one of its sessions is inside a transaction that wrote rows but has not
    touched its checkpoints; True if it is stopped in such a state (else the caller resumes it)."""
    sessions = ("SELECT a.wait_event = 'ClientRead' AS quiet, EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid "
                "AND l.mode = 'RowExclusiveLock' AND l.relation = to_regclass($2)) AS checkpointing "
                "FROM pg_stat_activity a WHERE a.application_name = $1 AND a.backend_xid IS NOT NULL")
    app = f"localflow {flow.task} {proc.pid}"[:63]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        if any(not r["checkpointing"] for r in await pg.fetch(sessions, app, flow.checkpoints)):
            proc.pause()
            # The server finishes what it was sent, then waits on the stopped client (ClientRead).
            (rows,) = await wait_for_async(lambda: quiet(pg, sessions, app, flow.checkpoints), timeout=5,
                                           message="the paused worker's sessions are waiting on it")
            return any(not r["checkpointing"] for r in rows)
        await asyncio.sleep(0.002)  # tight poll: a batch lasts about 100 ms
    return False


async def quiet(pg: asyncpg.Connection, sessions: str, *args: Any) -> tuple[list[asyncpg.Record]] | None:
    rows = await pg.fetch(sessions, *args)
    return (rows,) if all(r["quiet"] for r in rows) else None
