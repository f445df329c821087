"""Cluster scaling: throughput of 1, 2 and 3 ``localflow run --cluster`` workers on one catalog.

The catalog is the Sophia flow's processing half: raw documents (6 partitions) -> the enrichment
SQL derivation (6 partitions) -> the Postgres materialization. Every worker runs every task; the
derivation's and the materialization's consumer groups spread the 6 partitions over the workers.
The clock runs from the moment the documents can be read until Postgres holds all of them
durably (its checkpoint table), as in ``bench.workers.scaling``: the workers join and settle on
an empty collection, are paused (SIGSTOP, within the session timeout) while the documents are
produced, and resumed when the clock starts, so no worker gets a head start.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import asyncpg
import httpx

from bench.common import Row, Sample
from bench.harness import PG_SCHEMA, ROOT, Bench, BenchError, pg_ident
from bench.workers import Checkpoints, Worker, _drop, expect_rows, paused_drain, running
from pipeline.runtime.catalog import Catalog, topic_of

PARTITIONS = 6
WORKERS = (1, 2, 3)


class ClusterWorker(Worker):
    """``python -m pipeline run CATALOG --cluster NAME --metrics-port 0``: the whole catalog."""

    def __init__(self, bench: Bench, catalog: Catalog, cluster: str, label: str) -> None:
        assert catalog.path is not None
        self.log_path = bench.workdir / f"{label}.log"
        command = [sys.executable, "-m", "pipeline", "run", str(catalog.path), "--log-level", "info",
                   "--cluster", cluster, "--metrics-port", "0", "--config-topic", ""]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=bench.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def url(self) -> str | None:
        found = re.findall(r"metrics, health and status on (http://\S+)", self.log_path.read_text(errors="replace"))
        return found[-1] if found else None


def cluster_catalog(b: Bench, raw: str, derived: str, task: str, table: str) -> Catalog:
    sophia = b.sophia.collections["sophia/sophia_processed_data"]
    assert sophia.derive is not None
    derive = sophia.derive.model_dump(by_alias=True)
    derive["transforms"] = [{**t, "source": raw} for t in derive["transforms"]]
    return b.catalog({
        "collections": {
            raw: b.raw_collection(PARTITIONS),
            derived: {"schema": b.sophia.schema("sophia/sophia_processed_data"), "key": sophia.key,
                      "partitions": PARTITIONS, "derive": derive},
        },
        "materializations": {task: {
            "endpoint": {"postgres": {"url": "${POSTGRES_URL}", "schema": PG_SCHEMA}},
            "bindings": [{"source": derived, "resource": {"table": table}}],
        }},
    })


async def settled(workers: list[ClusterWorker], tasks: list[str], within: float = 180) -> None:
    """Wait until every worker's /status says it holds input partitions of every task (the groups
    have spread the partitions over all of them)."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=3.0) as client:
        while True:
            shares = []
            for w in workers:
                w.check_alive()
                url = w.url()
                try:
                    status = (await client.get(url + "/status")).json() if url else {}
                except (httpx.HTTPError, ValueError):
                    status = {}
                shares.append(all((status.get("tasks", {}).get(t) or {}).get("partitions") for t in tasks))
            if all(shares):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"cluster workers did not all get partitions of {tasks} within {within:.0f} s")
            await asyncio.sleep(0.2)  # polling the workers' /status, with a deadline


async def cluster(b: Bench) -> list[Row]:
    """Throughput of the derivation + Postgres materialization on 1, 2 and 3 cluster workers."""
    n = b.sizes.scaling_docs
    conn = await asyncpg.connect(b.services.postgres.url)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {pg_ident(PG_SCHEMA)}")
    rows: list[Row] = []
    try:
        for count in WORKERS:
            sample = await _run(b, conn, count, n)
            rows.append(Row(f"cluster: {count} worker(s), {PARTITIONS} partitions", "docs/s", sample.rate,
                            runs={"seconds": [round(sample.seconds, 2)], "cpu_seconds": [round(sample.cpu, 2)]}))
    finally:
        await conn.close()
    base = rows[0].localflow or 1
    for r in rows:
        r.note = (f"{r.localflow / base:.2f}x one worker; raw -> SQL derivation -> Postgres, "
                  f"`run --cluster`, {n:,} documents")
    return rows


async def _run(b: Bench, conn: asyncpg.Connection, count: int, n: int) -> Sample:
    run = b.name('cluster')  # the SQL reads the table sophia_raw_data: the collection's last name
    raw, derived = f"bench/{run}/sophia_raw_data", f"bench/{run}/sophia_processed_data"
    task, table = f"bench/{b.name('pg_cluster')}", b.name("pg_cluster")
    await b.create_topic(topic_of(raw), PARTITIONS)
    cat = cluster_catalog(b, raw, derived, task, table)
    checkpoints = Checkpoints(conn, task, PARTITIONS)
    try:
        with running([ClusterWorker(b, cat, run, f"cluster_{count}_{i}") for i in range(count)]) as workers:
            await checkpoints.wait(workers, holders=count, applied=0, within=180)
            await settled(workers, [derived, task])
            sample = await paused_drain(b, workers, checkpoints, raw, PARTITIONS, n, table=table, within=600)
        await expect_rows(conn, table, n)
    finally:
        await _drop(conn, table)
    return sample
