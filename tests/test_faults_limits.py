"""Fault trials of the limits: a record past the broker's message limit and a collection deleted
and recreated under a task (an offset gap), on small pipelines of the session servers, so they
run beside the Sophia pipeline's trials (test_faults*.py) instead of ending them.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Awaitable, Callable
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
from pipeline.runtime.catalog import KafkaConfig, load_catalog, topic_of
from pipeline.runtime.collection import Collection, CollectionWriter, read_to_end
from tests.support.cli import cli_env, localflow, worker
from tests.support.faults import FaultTable, TableReport
from tests.support.judge import Verdict
from tests.support.pipeline import EXAMPLE, PROCESSED, RAW
from tests.support.waiting import wait_for_async

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


@pytest.mark.parametrize("seen_empty", [False, True], ids=["refilled", "seen-empty"])
async def test_a_collection_deleted_and_recreated_under_a_materialization_stops_it_loudly_before_the_gap(
        tmp_path: Path, kafka_bootstrap: str, postgres_url: str, unique_name: Callable[..., str],
        fault_table: FaultTable, seen_empty: bool) -> None:
    """Nothing is committed past the gap; `localflow replay --from-beginning` is the way on.

    ``seen-empty``: the worker finds the gap before the new records arrive (the broker recreated the
    topic itself, with its own partition count), so the replay has nothing to apply to partition 0,
    and must still move its stored offset back to the partition's end."""
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
        if not seen_empty:
            await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in new])  # recreates it: offsets 0..4
        await wait_for_async(lambda: "is beyond the end of the partition" in w.output(), timeout=120,
                             message="the materialization to report the gap")
        if seen_empty:
            await _write_raw(catalog, f"{name}/raw", [_raw(i) for i in new])
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
        # The range the partition held when the worker looked: [0, 5) once the new records are in, [0, 0)
        # when the broker recreated the topic (auto-creation, its own partition count) before them.
        message = re.compile(rf"stored offset {len(old)} of {re.escape(topic)}\[0\] is beyond the end of the "
                             rf"partition, which holds offsets \[0, \d+\)")
        if not message.search(w.output()) or "localflow replay" not in w.output():
            v.problems.append("the error does not name topic, partition, stored offset, range and the way forward")
    replay = localflow("replay", str(catalog), "--materialization", f"{name}/pg", "--from-beginning", env=env,
                       timeout=120)
    if replay.returncode != 0:
        v.problems.append(f"replay exited {replay.returncode}: {replay.stdout[-2000:]}{replay.stderr[-1000:]}")
    held = await pg.ids()
    v.lose(len(set(old + new) - held), "documents missing after the replay")
    ends = {r.partition: r.offset + 1 for r in sorted(await read_to_end(KafkaConfig(bootstrap_servers=kafka_bootstrap), topic), key=lambda r: r.offset)}
    stored_after = await pg.next_offsets()
    if stored_after != {p: ends.get(p, 0) for p in stored_after.keys() | ends.keys()}:  # an empty partition ends at 0
        v.problems.append(f"after the replay the stored offsets are {stored_after}, not the partitions' ends {ends}; "
                          f"replay said:\n{replay.stdout[-3000:]}{replay.stderr[-3000:]}")
    v.keys, v.pg = len(held), (len(held), 0, len(old) + len(new))
    fault_table.add("gap", f"collection topic deleted and recreated ({'seen empty' if seen_empty else 'refilled'}) "
                    "under the Postgres materialization; "
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

    async def next_offsets(self) -> dict[int, int | None]:
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            return {r["partition"]: r["next_offset"] for r in await conn.fetch(
                f'SELECT partition, next_offset FROM "{self.schema}".{CHECKPOINTS} WHERE topic = $1', self.topic)}
        finally:
            await conn.close()

    async def next_offset(self) -> int | None:
        conn = await asyncpg.connect(self.url, timeout=10)
        try:
            return await conn.fetchval(f'SELECT next_offset FROM "{self.schema}".{CHECKPOINTS} WHERE topic = $1',
                                       self.topic)
        finally:
            await conn.close()
