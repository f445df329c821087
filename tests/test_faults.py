"""Fault injection across the whole Sophia pipeline: nothing lost, nothing doubled (SPEC "Guarantees").

One pipeline for the module, as users run it: every task of a catalog derived from
examples/sophia/flow.yaml in its own `localflow run --task` process, on private servers
(durable Tansu on its own moto, Postgres, Redis, a second moto for the archive behind a TCP
proxy) and real sources (an HTTP API, agent log files, a /metrics endpoint). Each test is one
trial: it feeds new source records, injects one kind of fault mid-stream, waits until the
pipeline settles and checks everything captured so far, at every stage:

* every API record and log line is in its collection under exactly one key (re-sends carry
  the same key), and derived once;
* every key is in Postgres (one row), in Redis (one key) and every Kafka offset in exactly one
  S3 object, or in the endpoint's dead letters, never both: captured = materialized + dead.

Each trial also feeds records Postgres cannot hold, API records without an id and over-long
log lines, so dead letters take part in the count. The trials are printed as a table (pytest -s,
the terminal summary, and `fault-table.txt` in pytest's base temp dir). `make chaos` runs the
long version: many rounds of kill -9 at random points, of tasks and servers.
"""

from __future__ import annotations

import asyncio
import copy
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from connectors.postgres.sql import CHECKPOINTS
from pipeline.catalog import KafkaConfig, load_catalog, topic_of
from pipeline.collection import Collection, CollectionWriter, read_to_end
from tests.cli_support import cli_env, localflow, worker
from tests.faults_support import CHAOS_ROUNDS, SEED, Sophia, _rows, _wait_rows, bad_input, open_sophia
from tests.helpers import wait_for_async
from tests.pipeline_harness import (
    AGENT_LOGS,
    API_TASK,
    CONSUMERS,
    EXAMPLE,
    METRICS,
    POSTGRES,
    PROCESSED,
    RAW,
    TASKS,
    Endpoints,
    Expected,
    FaultTable,
    TableReport,
    TopicContent,
    Verdict,
    judge,
)


@pytest.fixture(scope="module")
async def sophia(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> AsyncIterator[Sophia]:
    """This module's own pipeline (each test is one trial on it)."""
    async with open_sophia(tmp_path_factory, request) as running:
        yield running


def test_the_judge_counts_a_missing_row_as_lost_and_a_second_copy_as_doubled() -> None:
    """The checks have teeth: a row deleted, an object archived twice, a key both applied and refused."""
    expected = Expected(api_ids={"a", "b"}, log_lines=set())
    raw = TopicContent(messages=[(0, 0, "a", {"metadata": {"id": "a"}}), (0, 1, "b", {"metadata": {"id": "b"}})])
    processed = TopicContent(messages=[(0, 0, "a", {"id": "a"}), (1, 0, "b", {"id": "b"})],
                             dead=[{"task": POSTGRES, "original": '{"id": "b"}'}])
    topics = {RAW: raw, PROCESSED: processed, AGENT_LOGS: TopicContent(), METRICS: TopicContent()}
    ends = Endpoints(postgres={PROCESSED: ["a", "b"], AGENT_LOGS: [], METRICS: []},
                     redis={RAW: {"a", "b"}, PROCESSED: {"a"}, AGENT_LOGS: set(), METRICS: set()},
                     s3={RAW: Counter({(0, 0): 1, (0, 1): 2}), PROCESSED: Counter({(0, 0): 1, (1, 0): 1}),
                         AGENT_LOGS: Counter(), METRICS: Counter()})
    v = judge(expected, topics, ends, topics)
    assert (v.lost, v.doubled) == (1, 2), v.problems  # redis lost "b"; s3 doubled (0, 1); pg holds refused "b"
    assert judge(expected, topics, ends, topics).ok is False


async def test_without_faults_every_record_lands_once_in_every_endpoint(sophia: Sophia) -> None:
    fed = sophia.fed
    sophia.feed(40, 40)
    bad_input(sophia)
    await sophia.trial("baseline", "none", fed)


async def test_kill_9_of_every_task_at_random_points_loses_and_doubles_nothing(sophia: Sophia) -> None:
    fed = sophia.fed
    rng = random.Random(SEED)
    order = list(TASKS)
    rng.shuffle(order)
    with sophia.feeding(every=0.2, records=10, lines=25):  # busy enough that kills land mid-batch
        bad_input(sophia)
        for name in order:
            await asyncio.sleep(rng.uniform(0.3, 2.0))  # the random point of the kill
            task = sophia.pipeline.tasks[name]
            task.kill()
            await asyncio.sleep(rng.uniform(0, 0.5))  # an orchestrator's restart delay
            task.start()
    await sophia.trial("kill -9", f"each task once, order {','.join(t.split('/')[1] for t in order)} "
                                  f"(seed {SEED})", fed)


async def test_sigterm_during_a_busy_batch_flushes_commits_and_exits_0(sophia: Sophia) -> None:
    fed = sophia.fed
    before = await _rows(sophia)
    sophia.feed(600, 1500)
    bad_input(sophia)
    # Busy: the burst is on its way through every stage when the signal comes.
    await _wait_rows(sophia, lambda n: n > before, "Postgres to start taking the burst")
    codes = sophia.pipeline.stop()
    assert codes == dict.fromkeys(TASKS, 0), f"exit codes after SIGTERM: {codes}"
    for name in TASKS:
        assert "all tasks stopped; checkpoints committed" in sophia.log_of(name), name
    sophia.pipeline.start()
    await sophia.trial("SIGTERM", "every task mid-burst (600 records, 1500 lines)", fed)


async def test_a_2_mib_api_record_becomes_a_dead_letter_and_the_capture_goes_on(sophia: Sophia) -> None:
    fed = sophia.fed
    huge = f"huge-{fed}"
    sophia.sources.add_records([{"id": huge, "type": "user_query", "note": "x" * (2 * 1024 * 1024)}])
    sophia.feed(20, 20)
    bad_input(sophia)
    verdict = await sophia.trial("too large", "a 2 MiB API record among 20 (kafka.max_message_bytes 1 MiB)", fed)
    letters = [d for d in (await sophia.census.topics())[RAW].dead_from(API_TASK)
               if d.get("reason") == "too_large" and (d.get("source_position") or {}).get("id") == huge]
    assert len(letters) == 1, f"no too_large dead letter of {huge}"
    assert letters[0]["original_size"] > 2 * 1024 * 1024 and letters[0]["original_truncated"] is True
    assert "task failed" not in sophia.log_of(API_TASK), "the capture failed on the 2 MiB record"
    assert verdict.ok


@pytest.mark.chaos
@pytest.mark.timeout(3600)
async def test_chaos_kill_9_at_random_points_many_times(sophia: Sophia) -> None:
    """Rounds of random kills of tasks (often two at once) and servers, while feeding."""
    rng = random.Random(SEED + 1)
    for round_ in range(1, CHAOS_ROUNDS + 1):
        fed = sophia.fed
        done: list[str] = []
        with sophia.feeding():
            bad_input(sophia)
            for _ in range(rng.randint(4, 10)):
                await asyncio.sleep(rng.uniform(0.2, 2.5))  # the random point of the next kill
                victims = rng.sample(TASKS, rng.choice((1, 1, 2)))
                for name in victims:
                    sophia.pipeline.tasks[name].kill()
                await asyncio.sleep(rng.uniform(0, 1))  # an orchestrator's restart delay
                for name in victims:
                    sophia.pipeline.tasks[name].start()
                done += [v.split("/")[1] for v in victims]
            server = rng.choice(("postgres", "redis", "broker", "none"))
            if server == "postgres":
                sophia.ends.postgres.kill()
                await asyncio.sleep(rng.uniform(0.5, 3))  # the outage
                sophia.ends.postgres.start()
            elif server == "redis":
                sophia.ends.redis.kill()
                await asyncio.sleep(rng.uniform(0.5, 3))  # the outage
                sophia.ends.redis.start()
            elif server == "broker":
                sophia.infra.kafka.restart()
            done.append(f"server:{server}")
        await sophia.trial("chaos", f"round {round_}: {' '.join(done)} (seed {SEED + 1})", fed)


@pytest.mark.chaos
async def test_chaos_consumers_killed_together_mid_burst(sophia: Sophia) -> None:
    """Every consumer of the collections killed at once while a burst is being applied."""
    fed = sophia.fed
    before = await _rows(sophia)
    sophia.feed(1000, 2000)
    bad_input(sophia)
    await _wait_rows(sophia, lambda n: n > before, "Postgres to start taking the burst")
    for name in CONSUMERS:
        sophia.pipeline.tasks[name].kill()
    for name in CONSUMERS:
        sophia.pipeline.tasks[name].start()
    await sophia.trial("chaos", "derivation and all materializations kill -9 mid-burst", fed)


# ---------------------------------------------------------------------------- limits and gaps
# Smaller pipelines on the session servers (one task process each): their faults (a topic
# deleted under a task, a record past the broker's limit) would end the Sophia pipeline's run.


@pytest.fixture(scope="module")
def fault_table(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> FaultTable:
    """The table of these trials (the Sophia pipeline's trials have their own)."""
    table = FaultTable(tmp_path_factory.getbasetemp() / "fault-table-limits.txt")
    request.config.pluginmanager.register(TableReport(table), f"localflow-fault-table-{id(table)}")
    return table


def _small_catalog(path: Path, kafka: str, name: str, postgres_url: str = "", *, derive: bool = False) -> Path:
    """A collection of raw documents and either the Sophia enrichment of it or a Postgres table of it."""
    example = yaml.safe_load(EXAMPLE.read_text())
    raw = example["collections"][RAW]
    collections: dict[str, Any] = {f"{name}/raw": {**raw, "schema": str(EXAMPLE.parent / raw["schema"]), "partitions": 1}}
    doc: dict[str, Any] = {"kafka": {"bootstrap_servers": kafka}, "collections": collections}
    if derive:
        processed = example["collections"][PROCESSED]
        derived = copy.deepcopy(processed["derive"])
        derived["transforms"][0]["source"] = f"{name}/raw"
        derived["transforms"][0]["lambda"] = derived["transforms"][0]["lambda"].replace("sophia_raw_data", "raw")
        collections[f"{name}/processed"] = {**processed, "schema": str(EXAMPLE.parent / processed["schema"]),
                                            "partitions": 1, "derive": derived}
    else:
        doc["materializations"] = {f"{name}/pg": {
            "endpoint": {"postgres": {"url": postgres_url, "schema": name}},
            "bindings": [{"source": f"{name}/raw", "resource": {"table": "docs"}}]}}
    path.write_text(yaml.safe_dump(doc))
    return path


def _raw(ident: str, **data: Any) -> dict[str, Any]:
    return {"timestamp": "2026-12-01T10:00:00Z", "source": "trial", "data": {"type": "agent_interaction", **data},
            "metadata": {"id": ident}}


async def _write_raw(catalog: Path, collection: str, docs: list[dict[str, Any]]) -> None:
    cat = load_catalog(catalog)
    async with CollectionWriter(cat.kafka, "trial-writer") as writer:
        await writer.write(Collection.from_catalog(cat, collection), docs)


async def test_a_2_mib_document_into_a_derivation_becomes_a_dead_letter_and_the_derivation_goes_on(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str], fault_table: FaultTable) -> None:
    started = time.monotonic()
    name = unique_name("big")
    catalog = _small_catalog(tmp_path / "flow.yaml", kafka_bootstrap, name, derive=True)
    env = cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    raw, processed = topic_of(f"{name}/raw"), topic_of(f"{name}/processed")
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    huge = _raw("huge", blob="x" * (2 * 1024 * 1024))
    good = [f"g{i}" for i in range(30)]
    await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in good[:10]])
    # Written by a producer with a larger limit (the test broker takes multi-MiB records): the
    # derivation's output of it is larger than kafka.max_message_bytes (1 MiB by default).
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        await (await producer.send(raw, orjson.dumps(huge), key=orjson.dumps(["huge"])))
    finally:
        await producer.stop()
    await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in good[10:20]])
    with worker(catalog, "--task", f"{name}/processed", log=tmp_path / "derivation.log", env=env) as w:
        async def derived() -> set[str]:
            return {r.doc["id"] for r in await read_to_end(kafka, processed)}

        await wait_for_async(lambda: _has(derived, set(good[:20])), timeout=120, message="the first 20 derived")
        await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in good[20:]])  # the task goes on
        await wait_for_async(lambda: _has(derived, set(good)), timeout=60, message="all 30 derived")
        log = w.output()
    letters = [r.doc for r in await read_to_end(kafka, processed + ".dead")]
    v = Verdict(source_records=len(good) + 1, keys=len(await derived()))
    v.lose(len(set(good) - await derived()), "good documents not derived")
    v.double(int("huge" in await derived()), "the 2 MiB document was derived although it cannot fit")
    too_large = [d for d in letters if d.get("reason") == "too_large" and d.get("key") == '["huge"]']
    if len(too_large) != 1:
        v.problems.append(f"expected one too_large dead letter of the 2 MiB document, got {letters[:3]}")
    elif too_large[0]["original_size"] < 2 * 1024 * 1024 or not too_large[0]["original_truncated"]:
        v.problems.append(f"the dead letter does not describe the whole document: {too_large[0]['original_size']}")
    if "task failed" in log:
        v.problems.append("the derivation failed (and restarted) on the 2 MiB document")
    fault_table.add("too large", "a 2 MiB raw document into the derivation (kafka.max_message_bytes 1 MiB)",
                    len(good) + 1, v, time.monotonic() - started)
    print(f"\n{fault_table.render()}\n")
    assert v.ok, "\n".join(v.problems) + f"\nderivation log:\n{log[-3000:]}"


async def test_a_collection_deleted_and_recreated_under_a_materialization_stops_it_loudly_before_the_gap(
        tmp_path: Path, kafka_bootstrap: str, postgres_url: str, unique_name: Callable[..., str],
        fault_table: FaultTable) -> None:
    """Nothing is committed past the gap; `localflow replay --from-beginning` is the way on."""
    started = time.monotonic()
    name = unique_name("gap")
    catalog = _small_catalog(tmp_path / "flow.yaml", kafka_bootstrap, name, postgres_url)
    env = cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    topic = topic_of(f"{name}/raw")
    old, new = [f"old{i}" for i in range(20)], [f"new{i}" for i in range(5)]
    await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in old])
    pg = _PgState(postgres_url, name, topic)
    v = Verdict(source_records=len(old) + len(new))
    with worker(catalog, "--task", f"{name}/pg", "--metrics-port", "0", log=tmp_path / "pg.log", env=env) as w:
        url = w.url()
        await wait_for_async(lambda: _has(pg.ids, set(old)), timeout=120, message="the 20 documents in Postgres")
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
        await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in new])  # recreates it: offsets 0..4
        await wait_for_async(lambda: "is beyond the end of the partition" in w.output(), timeout=120,
                             message="the materialization to report the gap")
        async with httpx.AsyncClient(base_url=url) as http:
            ready = await http.get("/readyz")
            metric = (await http.get("/metrics")).text
            status = (await http.get("/status")).json()["tasks"][f"{name}/pg"]
        if ready.status_code != 503 or "beyond the end" not in ready.text:
            v.problems.append(f"/readyz does not report the gap: {ready.status_code} {ready.text[:300]}")
        gaps = [line for line in metric.splitlines() if line.startswith("localflow_errors_total{")
                and f'task="{name}/pg"' in line and 'kind="gap"' in line]
        if not gaps or not gaps[0].endswith(" 1.0"):
            v.problems.append(f"localflow_errors_total{{kind=gap}} is not 1: {gaps}")
        if status["restarts"] != 0 or status["running"]:
            v.problems.append(f"the task was restarted or still runs: {status}")
        held, stored = await pg.ids(), await pg.next_offset()
        v.double(len(held & set(new)), "documents past the gap were committed")
        if stored != len(old):
            v.problems.append(f"the stored offset moved past the gap: {stored}")
        message = f"stored offset {len(old)} of {topic}[0] is beyond the end of the partition, which holds offsets [0, 5)"
        if message not in w.output() or "localflow replay" not in w.output():
            v.problems.append("the error does not name topic, partition, stored offset, range and the way forward")
    replay = localflow("replay", str(catalog), "--materialization", f"{name}/pg", "--from-beginning", env=env,
                       timeout=120)
    if replay.returncode != 0:
        v.problems.append(f"replay exited {replay.returncode}: {replay.stderr[-500:]}")
    held = await pg.ids()
    v.lose(len(set(old + new) - held), "documents missing after the replay")
    if await pg.next_offset() != len(new):
        v.problems.append(f"after the replay the stored offset is {await pg.next_offset()}, not {len(new)}")
    v.keys, v.pg = len(held), (len(held), 0, len(old) + len(new))
    fault_table.add("gap", "collection topic deleted and recreated under the Postgres materialization; "
                    "then `localflow replay --from-beginning`", len(old) + len(new), v, time.monotonic() - started)
    print(f"\n{fault_table.render()}\n")
    assert v.ok, "\n".join(v.problems)


async def _has(get: Callable[[], Awaitable[set[str]]], want: set[str]) -> bool:
    return want <= await get()


@dataclass
class _PgState:
    """What the trial's Postgres materialization holds: row ids, and its stored next offset."""

    url: str
    schema: str
    topic: str

    async def ids(self) -> set[str]:
        try:
            conn = await asyncpg.connect(self.url, timeout=10)
        except (OSError, asyncpg.PostgresError):
            return set()
        try:
            rows = await conn.fetch(f'SELECT metadata->>\'id\' AS id FROM "{self.schema}".docs')
            return {r["id"] for r in rows}
        except asyncpg.UndefinedTableError:
            return set()
        finally:
            await conn.close()

    async def next_offset(self) -> int | None:
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            return await conn.fetchval(f'SELECT next_offset FROM "{self.schema}".{CHECKPOINTS} WHERE topic = $1',
                                       self.topic)
        finally:
            await conn.close()
