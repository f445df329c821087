"""`localflow replay`: backfill a materialization from the beginning or from a time, with progress."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from pipeline.runtime.catalog import load_catalog
from pipeline.runtime.collection import Collection, read_to_end
from tests.support.cli import DOC_SCHEMA, localflow, write_catalog
from tests.support.writing import produce


@pytest.fixture
async def pg(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_url)
    yield conn
    await conn.close()


def postgres_catalog(tmp_path: Path, name: str, schema: str) -> Path:
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{name}/events": {"schema": DOC_SCHEMA, "key": ["/id"], "partitions": 3}},
        "materializations": {f"{name}/pg": {
            "endpoint": {"postgres": {"url": "${POSTGRES_URL}", "schema": schema}},
            "bindings": [{"source": f"{name}/events", "resource": {"table": "events"}}]}},
    })


async def table(pg: asyncpg.Connection, schema: str) -> dict[str, int]:
    return {r["id"]: r["n"] for r in await pg.fetch(f'SELECT id, n FROM "{schema}".events')}


async def topic_last_per_key(catalog: Path, collection: str) -> dict[str, int]:
    cat = load_catalog(catalog)
    records = await read_to_end(cat.kafka, Collection.from_catalog(cat, collection).topic, timeout=60)
    return {r.doc["id"]: r.doc["n"] for r in sorted(records, key=lambda r: (r.partition, r.offset))}


async def test_replay_of_100k_documents_into_postgres_shows_progress_and_ends_with_the_table_equal_to_the_topic(
        tmp_path: Path, services_env: dict[str, str], pg: asyncpg.Connection,
        unique_name: Callable[..., str]) -> None:
    name, schema = unique_name(), unique_name("s")
    catalog = postgres_catalog(tmp_path, name, schema)
    docs = [{"id": f"k{i % 90_000}", "n": i} for i in range(100_000)]  # 10,000 keys written twice
    await produce(catalog, f"{name}/events", docs)

    result = localflow("replay", str(catalog), "--materialization", f"{name}/pg", "--from-beginning")

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "replaying 100,000 documents of 3 partition(s)" in out
    bars = [line for line in out.splitlines() if line.startswith(f"{name}/events[")]
    assert len(bars) == 3 and all("docs/s" in b and "ETA" in b for b in bars), out
    done = [int(b.split()[2].split("/")[0]) for b in bars]
    assert sum(done) == 100_000, out
    assert out.count(" done ") == 3 and "100,000 documents in" in out
    assert await table(pg, schema) == await topic_last_per_key(catalog, f"{name}/events")


async def produce_at(catalog: Path, collection: str, docs: list[dict[str, Any]], timestamp_ms: int) -> None:
    """Write documents with a given record time, as if they had been written then."""
    cat = load_catalog(catalog)
    c = Collection.from_catalog(cat, collection)
    producer = AIOKafkaProducer(**cat.kafka.client_options(), enable_idempotence=False)
    await producer.start()
    try:
        for d in docs:
            key, value = c.encode(d)
            await producer.send(c.topic, value, key=key, timestamp_ms=timestamp_ms)
        await producer.flush()
    finally:
        await producer.stop()


async def test_replay_from_a_timestamp_applies_only_documents_written_at_or_after_it(
        tmp_path: Path, services_env: dict[str, str], pg: asyncpg.Connection,
        unique_name: Callable[..., str]) -> None:
    name, schema = unique_name(), unique_name("s")
    catalog = postgres_catalog(tmp_path, name, schema)
    await produce(catalog, f"{name}/events", [])  # creates the topic with its 3 partitions
    await produce_at(catalog, f"{name}/events", [{"id": f"old{i}", "n": i} for i in range(300)],
                     1_767_225_600_000)  # 2026-01-01
    await produce_at(catalog, f"{name}/events", [{"id": f"new{i}", "n": i} for i in range(200)],
                     1_767_312_000_000)  # 2026-01-02

    result = localflow("replay", str(catalog), "-m", f"{name}/pg", "--from-timestamp", "2026-01-02T00:00:00Z")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "replaying 200 documents of 3 partition(s)" in result.stdout
    assert await table(pg, schema) == {f"new{i}": i for i in range(200)}


async def test_replay_restores_rows_and_leaves_the_checkpoint_at_the_end(
        tmp_path: Path, services_env: dict[str, str], pg: asyncpg.Connection,
        unique_name: Callable[..., str]) -> None:
    name, schema = unique_name(), unique_name("s")
    catalog = postgres_catalog(tmp_path, name, schema)
    await produce(catalog, f"{name}/events", [{"id": f"k{i}", "n": i} for i in range(1000)])
    assert localflow("replay", str(catalog), "-m", f"{name}/pg", "--from-beginning").returncode == 0
    checkpoints = f'SELECT topic, partition, next_offset FROM "{schema}".localflow_checkpoints ORDER BY 1, 2'
    before = await pg.fetch(checkpoints)
    await pg.execute(f'DELETE FROM "{schema}".events WHERE n < 500')

    result = localflow("replay", str(catalog), "-m", f"{name}/pg", "--from-beginning")

    assert result.returncode == 0, result.stdout + result.stderr
    assert await table(pg, schema) == {f"k{i}": i for i in range(1000)}
    assert await pg.fetch(checkpoints) == before, "a worker resumes where it was, not earlier"
    assert sum(r["next_offset"] for r in before) == 1000


def test_replay_needs_exactly_one_start_and_a_known_materialization(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = postgres_catalog(tmp_path, name, unique_name("s"))
    both = localflow("replay", str(catalog), "-m", f"{name}/pg", "--from-beginning", "--from-timestamp", "2026-01-01")
    assert both.returncode == 2 and "exactly one of --from-beginning or --from-timestamp" in both.stderr
    unknown = localflow("replay", str(catalog), "-m", "nope", "--from-beginning")
    assert unknown.returncode == 2 and f"materializations: {name}/pg" in unknown.stderr
    bad_time = localflow("replay", str(catalog), "-m", f"{name}/pg", "--from-timestamp", "yesterday")
    assert bad_time.returncode == 2 and "'yesterday' is not a time" in bad_time.stderr
