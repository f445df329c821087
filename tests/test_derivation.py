"""Derivations: the Sophia enrichment (the seed's SQL), Python transforms, several sources,
dead letters for failing inputs, `localflow validate` of lambdas, and exactly one output key
per input key after a worker is killed mid-stream. Broker tests run on the session Tansu."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.runtime.catalog import Catalog, KafkaConfig, load_catalog
from pipeline.runtime.collection import Collection, read_to_end
from pipeline.runtime.derivation import DerivationTask
from pipeline.runtime.task import TaskContext
from pipeline.sdk.errors import ConfigError
from pipeline.sdk.records import Record
from tests.support.waiting import wait_for_async
from tests.support.workers import Worker, task_worker
from tests.support.writing import produce
from transforms import sqlite as sqlite_engine
from transforms.sophia import enrich

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sophia"
RAW_SCHEMA = yaml.safe_load((EXAMPLE / "schemas" / "raw.schema.yaml").read_text())
PROCESSED_SCHEMA = yaml.safe_load((EXAMPLE / "schemas" / "processed.schema.yaml").read_text())

# The platform's enrichment, as SPEC.md quotes the seed.
SEED_SQL = """SELECT *, CURRENT_TIMESTAMP as processed_at,
  CASE WHEN data->>'type' = 'agent_interaction' THEN 'high'
       WHEN data->>'type' = 'system_metric' THEN 'medium'
       ELSE 'low' END as priority
FROM sophia_raw_data WHERE data IS NOT NULL"""


def raw(id_: str, data: Any, source: str = "sophia-api") -> dict[str, Any]:
    return {"timestamp": "2025-01-06T10:00:00Z", "source": source, "data": data, "metadata": {"id": id_}}


# -------------------------------------------------------------------------------- catalogs


def write_catalog(tmp_path: Path, kafka_bootstrap: str, collections: dict[str, Any]) -> Catalog:
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"bootstrap_servers": kafka_bootstrap}, "collections": collections},
                                   sort_keys=False))
    return load_catalog(path, env={})


def sophia_collections(prefix: str) -> dict[str, Any]:
    """The example's raw and processed collections, with its derivation, under a unique prefix."""
    example = yaml.safe_load((EXAMPLE / "flow.yaml").read_text())["collections"]
    derive = example["sophia/sophia_processed_data"]["derive"]
    derive["transforms"][0]["source"] = f"{prefix}/sophia_raw_data"
    return {
        f"{prefix}/sophia_raw_data": {"schema": RAW_SCHEMA, "key": ["/metadata/id"], "partitions": 3},
        f"{prefix}/sophia_processed_data": {"schema": PROCESSED_SCHEMA, "key": ["/id"], "partitions": 3,
                                            "derive": derive},
    }


def derived_by(prefix: str, engine: str, transforms: list[dict[str, str]],
               schema: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    return {f"{prefix}/out": {"schema": schema or PROCESSED_SCHEMA, "key": ["/id"],
                              "derive": {"using": {engine: options}, "transforms": transforms}}}


# -------------------------------------------------------------------------------- broker helpers


async def produce_unvalidated(catalog: Catalog, collection: str, key: list[Any], value: bytes) -> None:
    """What another producer could put in a topic: bytes the collection's schema never saw."""
    producer = AIOKafkaProducer(bootstrap_servers=catalog.kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(Collection.from_catalog(catalog, collection).topic, value,
                                     key=orjson.dumps(key))
    finally:
        await producer.stop()


@asynccontextmanager
async def derivation(catalog: Catalog, name: str, options: dict[str, Any] | None = None,
                     **reader: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run the derivation task in this process; on exit stop it as SIGTERM would, and re-raise its error."""
    ctx = TaskContext(catalog, name, "derivation", options={"reader": reader, **(options or {})})
    task = asyncio.create_task(DerivationTask(ctx).run())
    try:
        yield task
    finally:
        ctx.stopping.set()
        await asyncio.wait_for(task, 30)


async def read_docs(catalog: Catalog, topic: str, task: asyncio.Task[None] | None = None,
                    count: int = 0) -> list[Record]:
    """The topic's records once there are at least ``count`` (fails fast if the task died)."""

    async def enough() -> list[Record] | None:
        if task is not None and task.done():
            task.result()
        records = await read_to_end(catalog.kafka, topic)
        return records if len(records) >= count else None

    return await wait_for_async(enough, timeout=60, interval=0.2, message=f"{count} records in {topic}")


async def committed(kafka: KafkaConfig, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            offset = await consumer.committed(TopicPartition(topic, p))
            out[p] = offset or 0
        return out
    finally:
        await consumer.stop()


def by_id(records: list[Record]) -> dict[str, dict[str, Any]]:
    return {r.doc["id"]: r.doc for r in records}


# -------------------------------------------------------------------------------- the Sophia SQL


def test_sophia_lambda_runs_the_seed_select_verbatim() -> None:
    catalog = load_catalog(EXAMPLE / "flow.yaml", env={})
    derive = catalog.collections["sophia/sophia_processed_data"].derive
    assert derive is not None and derive.engine == "sqlite"
    assert SEED_SQL in derive.transforms[0].lambda_


def test_seed_select_alone_is_a_catalog_error_naming_the_missing_properties(tmp_path: Path) -> None:
    collections = sophia_collections("p")
    collections["p/sophia_processed_data"]["derive"]["transforms"][0]["lambda"] = SEED_SQL
    with pytest.raises(ConfigError) as e:
        write_catalog(tmp_path, "127.0.0.1:9", collections)
    [(place, message)] = e.value.problems
    assert place == "collections.p/sophia_processed_data.derive.transforms[0].lambda"
    assert "['id', 'processed_data']" in message


async def test_sophia_derivation_enriches_each_data_type(tmp_path: Path, kafka_bootstrap: str,
                                                         unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog = write_catalog(tmp_path, kafka_bootstrap, sophia_collections(p))
    raw_name, processed = f"{p}/sophia_raw_data", f"{p}/sophia_processed_data"
    await produce(catalog, raw_name, [
        raw("a", {"type": "agent_interaction", "agent_id": "research", "confidence": 0.9}),
        raw("m", {"type": "system_metric", "name": "cpu", "value": 0.7, "confidence": 1.5}),
        raw("u", {"type": "user_query", "query": "status?", "confidence": "high"}),
        raw("x", {"message": "no type"}, source="agent-logs"),
    ])
    await produce_unvalidated(catalog, raw_name, ["n"], orjson.dumps(raw("n", None)))
    started = datetime.now(UTC).replace(microsecond=0)

    async with derivation(catalog, processed) as task:
        records = await read_docs(catalog, Collection.from_catalog(catalog, processed).topic, task, 4)

    docs = by_id(records)
    assert sorted(docs) == ["a", "m", "u", "x"]  # nothing for data null
    assert {i: d["enrichments"]["priority"] for i, d in docs.items()} == \
        {"a": "high", "m": "medium", "u": "low", "x": "low"}
    assert docs["a"] == {
        "id": "a", "timestamp": "2025-01-06T10:00:00Z", "source": "sophia-api",
        "processed_data": {"type": "agent_interaction", "agent_id": "research", "confidence": 0.9},
        "enrichments": {"priority": "high", "processed_at": docs["a"]["enrichments"]["processed_at"]},
        "confidence_score": 0.9,
    }
    assert [i for i, d in docs.items() if "confidence_score" in d] == ["a"]  # 1.5 and "high" are not scores
    assert docs["x"]["source"] == "agent-logs"
    processed_collection = Collection.from_catalog(catalog, processed)
    for d in docs.values():
        processed_collection.validate(d)
        at = datetime.fromisoformat(d["enrichments"]["processed_at"].replace("Z", "+00:00"))
        assert started - timedelta(seconds=1) <= at <= datetime.now(UTC)


async def test_output_that_breaks_the_schema_is_a_dead_letter_naming_the_transform(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog = write_catalog(tmp_path, kafka_bootstrap, sophia_collections(p))
    raw_name, processed = f"{p}/sophia_raw_data", Collection.from_catalog(catalog, f"{p}/sophia_processed_data")
    no_metadata = {"timestamp": "2025-01-06T10:00:00Z", "source": "old-writer", "data": {"type": "user_query"}}
    await produce_unvalidated(catalog, raw_name, ["old"], orjson.dumps(no_metadata))
    await produce(catalog, raw_name, [raw("ok", {"type": "user_query"})])

    async with derivation(catalog, processed.name) as task:
        [dead] = await read_docs(catalog, processed.dead_topic, task, 1)
        [record] = await read_docs(catalog, processed.topic, task, 1)

    assert record.doc["id"] == "ok"
    envelope = orjson.loads(dead.value)
    assert (envelope["transform"], envelope["reason"]) == ("enrich", "invalid")
    assert "id" in envelope["error"] and orjson.loads(envelope["original"])["source"] == "old-writer"


async def test_stopped_worker_has_committed_every_input(tmp_path: Path, kafka_bootstrap: str,
                                                       unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog = write_catalog(tmp_path, kafka_bootstrap, sophia_collections(p))
    raw_name, processed = f"{p}/sophia_raw_data", f"{p}/sophia_processed_data"
    docs = [raw(f"k{i}", {"type": "user_query", "n": i}) for i in range(30)]
    await produce(catalog, raw_name, docs)

    async with derivation(catalog, processed) as task:
        await read_docs(catalog, Collection.from_catalog(catalog, processed).topic, task, 30)

    raw_topic = Collection.from_catalog(catalog, raw_name).topic
    ends = {p_: len([r for r in await read_to_end(catalog.kafka, raw_topic) if r.partition == p_]) for p_ in range(3)}
    assert await committed(catalog.kafka, f"localflow.{processed}", raw_topic, 3) == ends


def test_sql_and_python_enrichments_agree() -> None:
    catalog = load_catalog(EXAMPLE / "flow.yaml", env={})
    sql = sqlite_engine.build(catalog, "sophia/sophia_processed_data")
    sql.open()
    inputs = [*catalog.tests["sophia/enrichment"][0].ingest.documents,  # type: ignore[union-attr]
              raw("big", {"type": "agent_interaction", "confidence": 1}),
              raw("neg", {"type": "system_metric", "confidence": -0.1}),
              raw("bool", {"confidence": True}),
              raw("null", None)]

    def without_clock(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "enrichments": {**doc["enrichments"], "processed_at": None}}

    by_sql = [without_clock(d) for d in sql.apply(0, inputs).documents]
    by_python = [without_clock(d) for d in map(enrich, inputs) if d is not None]
    assert by_sql == by_python
    assert len(by_sql) == len(inputs) - 1


def test_example_catalog_test_matches_what_the_sqlite_engine_makes() -> None:
    catalog = load_catalog(EXAMPLE / "flow.yaml", env={})
    [ingest_step, verify_step] = catalog.tests["sophia/enrichment"]
    assert ingest_step.ingest is not None and verify_step.verify is not None
    engine = sqlite_engine.build(catalog, verify_step.verify.collection)
    engine.open()
    made = {d["id"]: d for d in engine.apply(0, ingest_step.ingest.documents).documents}

    def contains(actual: Any, expected: Any) -> bool:  # Estuary's verify: expected is a subset
        if isinstance(expected, dict):
            return isinstance(actual, dict) and all(k in actual and contains(actual[k], v)
                                                    for k, v in expected.items())
        return actual == expected

    expected = verify_step.verify.documents
    assert sorted(made) == [d["id"] for d in expected]
    for doc in expected:
        assert contains(made[doc["id"]], doc), (made[doc["id"]], doc)


# -------------------------------------------------------------------------------- engine rules


def test_json_column_is_the_whole_document(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path, "127.0.0.1:9", {
        "p/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by("p", "sqlite", [{"name": "t", "source": "p/in", "lambda":
            "SELECT CASE WHEN data->>'skip' THEN NULL ELSE json_object("
            "'id', metadata->>'id', 'timestamp', timestamp, 'source', source, 'processed_data', json(data), "
            "'enrichments', json_object('processed_at', '2025-01-02 03:04:05')) END AS json FROM \"in\""}]),
    })
    engine = sqlite_engine.build(catalog, "p/out")
    engine.open()
    out = engine.apply(0, [raw("1", {"a": [1, 2]}), raw("2", {"skip": True})])
    assert out.documents == [{"id": "1", "timestamp": "2025-01-06T10:00:00Z", "source": "sophia-api",
                              "processed_data": {"a": [1, 2]},
                              "enrichments": {"processed_at": "2025-01-02T03:04:05Z"}}]


def test_null_column_is_kept_only_where_the_schema_allows_null(tmp_path: Path) -> None:
    schema = {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "string"}, "score": {"type": "number"}, "note": {"type": ["string", "null"]},
        "flag": {"type": "boolean"}}}
    catalog = write_catalog(tmp_path, "127.0.0.1:9", {
        "p/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by("p", "sqlite", [{"name": "t", "source": "p/in", "lambda":
            "SELECT metadata->>'id' AS id, NULL AS score, NULL AS note, 1 = 1 AS flag FROM \"in\""}], schema),
    })
    engine = sqlite_engine.build(catalog, "p/out")
    engine.open()
    assert engine.apply(0, [raw("1", {})]).documents == [{"id": "1", "note": None, "flag": True}]


SHAPE = "metadata->>'id' AS id, timestamp, source, data AS processed_data"
REORDERING = {
    "order by": f'SELECT {SHAPE} FROM "in" ORDER BY data->>\'v\' DESC',
    "group by": f'SELECT {SHAPE} FROM "in" GROUP BY metadata->>\'id\', data->>\'v\'',
    "distinct": f'SELECT DISTINCT {SHAPE} FROM "in" ORDER BY 1, data->>\'v\'',
    "order by, with flow_seq": f'SELECT *, {SHAPE} FROM "in" ORDER BY data->>\'v\' DESC',
    "group by, with max(flow_seq)": f'SELECT {SHAPE}, max(flow_seq) AS flow_seq FROM "in" '
                                    f'GROUP BY metadata->>\'id\', data->>\'v\'',
}


def reordering_engine(tmp_path: Path, lambda_: str, **options: Any) -> sqlite_engine.SqliteEngine:
    catalog = write_catalog(tmp_path, "127.0.0.1:9", {
        "p/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by("p", "sqlite", [{"name": "t", "source": "p/in", "lambda": lambda_}], **options),
    })
    engine = sqlite_engine.build(catalog, "p/out")
    engine.open()
    return engine


# Two versions of key k in one batch, the newer one (v: 1) last, and the lambda's order puts it first.
VERSIONS = [raw("k", {"v": 2}), raw("j", {"v": 9}), raw("k", {"v": 1})]


@pytest.mark.parametrize("lambda_", list(REORDERING.values()), ids=list(REORDERING))
def test_outputs_keep_input_order_whatever_the_lambda_orders_by(tmp_path: Path, lambda_: str) -> None:
    out = reordering_engine(tmp_path, lambda_).apply(0, VERSIONS)
    made = [(d["id"], d["processed_data"]["v"], source) for d, source in zip(out.documents, out.sources, strict=True)]
    assert made == [("k", 2, 0), ("j", 9, 1), ("k", 1, 2)]  # the newer k last, each with its input
    assert all("flow_seq" not in d for d in out.documents)


def test_order_lambda_keeps_the_lambdas_order(tmp_path: Path) -> None:
    out = reordering_engine(tmp_path, REORDERING["order by, with flow_seq"], order="lambda").apply(0, VERSIONS)
    assert [(d["processed_data"]["v"], source) for d, source in zip(out.documents, out.sources, strict=True)] == \
        [(9, 1), (2, 0), (1, 2)]


def test_a_lambda_without_flow_seq_runs_per_document_and_dead_letters_only_the_failing_one(tmp_path: Path) -> None:
    lambda_ = f'SELECT {SHAPE}, json(data->>\'payload\') AS parsed FROM "in"'
    docs = [raw("a", {"payload": "[1]"}), raw("b", {"payload": "not json"}), raw("c", {"payload": "[3]"})]
    out = reordering_engine(tmp_path, lambda_).apply(0, docs)
    assert [d["id"] for d in out.documents] == ["a", "c"] and out.sources == [0, 2]
    assert [i for i, _ in out.failed] == [1]


def test_two_sources_whose_names_end_the_same_are_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        write_catalog(tmp_path, "127.0.0.1:9", {
            "a/logs": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
            "b/logs": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
            **derived_by("p", "sqlite", [
                {"name": "t", "source": "a/logs", "lambda": "SELECT * FROM logs"},
                {"name": "u", "source": "b/logs", "lambda": "SELECT * FROM logs"}]),
        })
    assert e.value.problems == [("collections.p/out.derive.transforms[1].source",
                                 "its table would be 'logs', already the table of a/logs; "
                                 "a derivation cannot read two sources whose names end the same")]


# -------------------------------------------------------------------------------- localflow validate


def validate(tmp_path: Path, collections: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "flow.yaml"
    path.write_text(yaml.safe_dump({"collections": collections}, sort_keys=False))
    return subprocess.run([sys.executable, "-m", "pipeline", "validate", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)})


def test_validate_reports_sql_that_does_not_compile(tmp_path: Path) -> None:
    result = validate(tmp_path, {
        "p/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by("p", "sqlite", [{"name": "t", "source": "p/in",
                                      "lambda": "SELECT metadata->>'id' AS id, nope FROM \"in\""}]),
    })
    assert result.returncode == 2, result
    assert "collections.p/out.derive.transforms[0].lambda: SQLite rejects it: no such column: nope" in result.stderr
    assert "in(timestamp, source, data, metadata, flow_seq)" in result.stderr


def test_validate_reports_a_python_transform_that_cannot_be_imported(tmp_path: Path) -> None:
    result = validate(tmp_path, {
        "p/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by("p", "python", [{"name": "t", "source": "p/in", "lambda": "transforms.sophia:enrich"},
                                     {"name": "u", "source": "p/in", "lambda": "no_such_module_xyz:f"}]),
    })
    assert result.returncode == 2, result
    assert "collections.p/out.derive.transforms[1].lambda: cannot import module 'no_such_module_xyz'" in result.stderr
    assert "transforms[0]" not in result.stderr


# -------------------------------------------------------------------------------- Python, several sources


SHOUT = """
def shout(doc):
    \"\"\"One output per word of data.text, none without text; raises on 'boom'.\"\"\"
    text = doc["data"].get("text")
    if text == "boom":
        raise RuntimeError("cannot shout boom")
    if not text:
        return None
    return [{"id": f"{doc['metadata']['id']}-{i}", "timestamp": doc["timestamp"], "source": "shout",
             "processed_data": {"word": w.upper()}} for i, w in enumerate(text.split())]
"""


def shout_catalog(tmp_path: Path, kafka_bootstrap: str, p: str) -> Catalog:
    """A Python derivation whose module sits next to the catalog, as a user would write it."""
    (tmp_path / f"{p}_functions.py").write_text(SHOUT)
    return write_catalog(tmp_path, kafka_bootstrap, {
        f"{p}/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by(p, "python", [{"name": "shout", "source": f"{p}/in", "lambda": f"{p}_functions:shout"}]),
    })


async def shouted(tmp_path: Path, kafka_bootstrap: str, p: str) -> tuple[Catalog, list[Record]]:
    """The shout derivation's outputs of inputs a (two words, offset 0), b (none) and c (one, offset 2)."""
    catalog = shout_catalog(tmp_path, kafka_bootstrap, p)
    await produce(catalog, f"{p}/in", [raw("a", {"text": "hello world"}), raw("b", {}), raw("c", {"text": "hi"})])
    async with derivation(catalog, f"{p}/out") as task:
        return catalog, await read_docs(catalog, Collection.from_catalog(catalog, f"{p}/out").topic, task, 3)


async def test_python_transform_end_to_end(tmp_path: Path, kafka_bootstrap: str,
                                           unique_name: Callable[..., str]) -> None:
    _, records = await shouted(tmp_path, kafka_bootstrap, unique_name())
    assert {i: d["processed_data"]["word"] for i, d in by_id(records).items()} == \
        {"a-0": "HELLO", "a-1": "WORLD", "c-0": "HI"}


async def test_each_output_carries_the_source_position_of_its_input(tmp_path: Path, kafka_bootstrap: str,
                                                                    unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog, records = await shouted(tmp_path, kafka_bootstrap, p)
    clock = f"{Collection.from_catalog(catalog, f'{p}/in').topic}:0"
    assert {r.doc["id"]: r.source for r in records} == {"a-0": (clock, 0), "a-1": (clock, 0), "c-0": (clock, 2)}


SLOW = """
import time

def slow(doc):
    if doc["metadata"]["id"] == "slow":
        time.sleep(4)  # longer than the session: the loop must go on heartbeating meanwhile
    return {"id": doc["metadata"]["id"], "timestamp": doc["timestamp"], "source": "slow", "processed_data": {}}
"""


async def test_a_lambda_slower_than_the_session_keeps_its_partitions_and_commits(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    p = unique_name()
    (tmp_path / f"{p}_slow.py").write_text(SLOW)
    catalog = write_catalog(tmp_path, kafka_bootstrap, {
        f"{p}/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        **derived_by(p, "python", [{"name": "slow", "source": f"{p}/in", "lambda": f"{p}_slow:slow"}]),
    })
    await produce(catalog, f"{p}/in", [raw("slow", {}), raw("a", {})])
    in_topic = Collection.from_catalog(catalog, f"{p}/in").topic

    ticks: list[float] = []

    async def tick() -> None:  # what heartbeats need: the loop to run while the lambda does
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    ticker = asyncio.create_task(tick())
    try:
        async with derivation(catalog, f"{p}/out", session_timeout_ms=2000, heartbeat_interval_ms=300) as task:
            await read_docs(catalog, Collection.from_catalog(catalog, f"{p}/out").topic, task, 2)

            async def both_committed() -> bool:
                return (await committed(catalog.kafka, f"localflow.{p}/out", in_topic, 1)) == {0: 2}

            await wait_for_async(both_committed, timeout=30, message="the slow batch's commit")
            assert not task.done()
        # (leaving the block re-raises the task's error: a failed commit would show here)
    finally:
        ticker.cancel()
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 1.0, "the event loop stalled with the lambda"


async def test_a_batch_past_its_time_bound_commits_what_it_derived_and_reads_the_rest_again(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog = shout_catalog(tmp_path, kafka_bootstrap, p)
    await produce(catalog, f"{p}/in", [raw(f"k{i}", {"text": f"w{i}"}) for i in range(9)])
    out = Collection.from_catalog(catalog, f"{p}/out")

    async with derivation(catalog, out.name, {"batch_seconds": 0, "slice_records": 2}) as task:
        await read_docs(catalog, out.topic, task, 9)
        await wait_for_async(lambda: _committed_total(catalog, f"localflow.{out.name}",
                                                      Collection.from_catalog(catalog, f"{p}/in").topic, 9, 1),
                             timeout=30, message="all 9 inputs committed")
    records = await read_to_end(catalog.kafka, out.topic)
    assert sorted(r.doc["id"] for r in records) == sorted(f"k{i}-0" for i in range(9))  # each once: none lost


async def test_python_transform_that_raises_dead_letters_its_input(tmp_path: Path, kafka_bootstrap: str,
                                                                  unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog = shout_catalog(tmp_path, kafka_bootstrap, p)
    out = Collection.from_catalog(catalog, f"{p}/out")
    await produce(catalog, f"{p}/in", [raw("a", {"text": "x"}), raw("bad", {"text": "boom"}), raw("c", {"text": "y"})])

    async with derivation(catalog, out.name) as task:
        records = await read_docs(catalog, out.topic, task, 2)
        [dead] = await read_docs(catalog, out.dead_topic, task, 1)

    assert sorted(by_id(records)) == ["a-0", "c-0"]
    envelope = orjson.loads(dead.value)
    assert envelope["transform"] == "shout" and envelope["reason"] == "transform"
    assert "RuntimeError: cannot shout boom" in envelope["error"]
    assert orjson.loads(envelope["original"])["metadata"]["id"] == "bad"


async def test_sql_runtime_error_dead_letters_only_the_failing_input(tmp_path: Path, kafka_bootstrap: str,
                                                                    unique_name: Callable[..., str]) -> None:
    p = unique_name()
    # json() of a text that is not JSON is a runtime error for that row only.
    lambda_ = ("SELECT metadata->>'id' AS id, timestamp, source, "
               "json_object('parsed', json(data->>'payload')) AS processed_data FROM \"in\"")
    catalog = write_catalog(tmp_path, kafka_bootstrap, {
        f"{p}/in": {"schema": RAW_SCHEMA, "key": ["/metadata/id"], "partitions": 1},
        **derived_by(p, "sqlite", [{"name": "parse", "source": f"{p}/in", "lambda": lambda_}]),
    })
    out = Collection.from_catalog(catalog, f"{p}/out")
    good = [raw(f"g{i}", {"payload": f'{{"n": {i}}}'}) for i in range(7)]
    await produce(catalog, f"{p}/in", [*good[:3], raw("bad", {"payload": "not json"}), *good[3:]])

    async with derivation(catalog, out.name) as task:
        records = await read_docs(catalog, out.topic, task, 7)
        [dead] = await read_docs(catalog, out.dead_topic, task, 1)

    assert {i: d["processed_data"]["parsed"]["n"] for i, d in by_id(records).items()} == {f"g{i}": i for i in range(7)}
    envelope = orjson.loads(dead.value)
    assert (envelope["transform"], envelope["reason"], envelope["offset"]) == ("parse", "transform", 3)
    assert "malformed JSON" in envelope["error"]


async def test_two_sources_feed_one_derived_collection(tmp_path: Path, kafka_bootstrap: str,
                                                       unique_name: Callable[..., str]) -> None:
    p = unique_name()
    shape = "SELECT '{tag}-' || (metadata->>'id') AS id, timestamp, source, data AS processed_data FROM {table}"
    catalog = write_catalog(tmp_path, kafka_bootstrap, {
        f"{p}/logs": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]},
        f"{p}/metrics": {"schema": RAW_SCHEMA, "key": ["/metadata/id"], "partitions": 2},
        **derived_by(p, "sqlite", [
            {"name": "from_logs", "source": f"{p}/logs", "lambda": shape.format(tag="log", table="logs")},
            {"name": "from_metrics", "source": f"{p}/metrics", "lambda": shape.format(tag="metric", table="metrics")},
        ]),
    })
    await produce(catalog, f"{p}/logs", [raw("1", {"line": "started"}, "agent-logs")])
    await produce(catalog, f"{p}/metrics", [raw("1", {"cpu": 0.5}, "prometheus"), raw("2", {"cpu": 0.6}, "prometheus")])

    async with derivation(catalog, f"{p}/out") as task:
        records = await read_docs(catalog, Collection.from_catalog(catalog, f"{p}/out").topic, task, 3)

    assert {i: d["processed_data"] for i, d in by_id(records).items()} == {
        "log-1": {"line": "started"}, "metric-1": {"cpu": 0.5}, "metric-2": {"cpu": 0.6}}


# -------------------------------------------------------------------------------- crash


async def test_rerun_of_inputs_whose_commit_was_lost_rewrites_the_same_keys(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    # The state a crash between "outputs acknowledged" and "inputs committed" leaves behind,
    # made on purpose: every output written, the group's offsets back at the beginning.
    p = unique_name()
    catalog = write_catalog(tmp_path, kafka_bootstrap, sophia_collections(p))
    raw_name, processed = f"{p}/sophia_raw_data", f"{p}/sophia_processed_data"
    await produce(catalog, raw_name, [raw(f"k{i}", {"type": "system_metric", "n": i}) for i in range(50)])
    topic = Collection.from_catalog(catalog, processed).topic
    # A short session: Tansu numbers the first generation 0, after which aiokafka does not send
    # LeaveGroup, so the rewind below waits for this member's session to expire.
    async with derivation(catalog, processed, session_timeout_ms=6000) as task:
        await read_docs(catalog, topic, task, 50)
    await rewind(catalog.kafka, f"localflow.{processed}", Collection.from_catalog(catalog, raw_name).topic, 3)

    async with derivation(catalog, processed) as task:
        records = await read_docs(catalog, topic, task, 100)

    assert len(records) == 100
    copies: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        copies.setdefault(r.doc["id"], []).append({**r.doc, "enrichments": {**r.doc["enrichments"], "processed_at": None}})
    assert sorted(copies) == sorted(f"k{i}" for i in range(50))
    assert all(len(c) == 2 and c[0] == c[1] for c in copies.values())


async def rewind(kafka: KafkaConfig, group: str, topic: str, partitions: int) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:  # as a member of the group: some brokers (Tansu) refuse commits from outside it
        consumer.subscribe([topic])

        async def assigned() -> bool:
            await consumer.getmany(timeout_ms=100)
            return len(consumer.assignment()) == partitions

        await wait_for_async(assigned, timeout=30, message=f"an assignment in {group}")
        await consumer.commit({TopicPartition(topic, p): 0 for p in range(partitions)})
    finally:
        await consumer.stop()


async def test_worker_killed_mid_stream_leaves_one_output_key_per_input_key(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    p = unique_name()
    catalog = write_catalog(tmp_path, kafka_bootstrap, sophia_collections(p))
    raw_name, processed = f"{p}/sophia_raw_data", f"{p}/sophia_processed_data"
    total = 20_000
    kinds = ["agent_interaction", "system_metric", "user_query"]
    await produce(catalog, raw_name, [raw(f"k{i}", {"type": kinds[i % 3], "n": i}) for i in range(total)])
    raw_topic = Collection.from_catalog(catalog, raw_name).topic
    group = f"localflow.{processed}"
    options = {"reader": {"max_records": 200, "session_timeout_ms": 6000}}

    def worker() -> Worker:
        return task_worker(catalog.path, processed, tmp_path / "worker.log", options=options)

    with worker() as first:
        progress = await wait_for_async(
            lambda: _committed_total(catalog, group, raw_topic), timeout=60, interval=0.02,
            message="the first worker to commit some batches")
        first.kill()
    assert progress < total, "the worker finished before it was killed: the test proved nothing"

    with worker() as second:
        await wait_for_async(lambda: _committed_total(catalog, group, raw_topic, total), timeout=120,
                             interval=0.2, message=f"the second worker to commit all {total} inputs")
        records = await read_to_end(catalog.kafka, Collection.from_catalog(catalog, processed).topic, timeout=60)
        second.assert_exit(second.stop(timeout=30))

    keys = [r.doc["id"] for r in records]
    assert set(keys) == {f"k{i}" for i in range(total)}
    first_copy: dict[str, dict[str, Any]] = {}
    for r in records:  # a key written twice was re-written from the same input
        doc = {**r.doc, "enrichments": {**r.doc["enrichments"], "processed_at": None}}
        assert first_copy.setdefault(doc["id"], doc) == doc


async def _committed_total(catalog: Catalog, group: str, topic: str, at_least: int = 1,
                           partitions: int = 3) -> int | None:
    total = sum((await committed(catalog.kafka, group, topic, partitions)).values())
    return total if total >= at_least else None

