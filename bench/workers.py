"""Benchmarks of worker processes (``python -m pipeline run``): memory while a backlog drains, and
throughput as partitions and workers are added.

Both use the postgres materialization, whose checkpoint table (``localflow_checkpoints``: one row
per partition with its fence and next offset, written in the same transaction as the rows) says
from outside the worker when it was assigned each partition and how far it durably got.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import asyncpg
import orjson

from bench.common import RAW_KEY, RAW_SCHEMA, Row, Sample, chunks, sophia_docs, tree_cpu
from bench.harness import PG_SCHEMA, ROOT, Bench, BenchError, pg_ident, pg_table
from pipeline.runtime.catalog import Catalog, topic_of
from pipeline.runtime.collection import Collection

MiB = 1024 * 1024


class Worker:
    """One ``python -m pipeline run CATALOG --task ...`` subprocess; its log goes to a file."""

    def __init__(self, bench: Bench, catalog: Catalog, tasks: list[str], label: str) -> None:
        assert catalog.path is not None
        self.log_path = bench.workdir / f"{label}.log"
        command = [sys.executable, "-m", "pipeline", "run", str(catalog.path), "--log-level", "info"]
        for task in tasks:
            command += ["--task", task]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=bench.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status_kib(self, field: str) -> int:
        """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB; 0 once the process is gone."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"worker {self.pid} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (the worker flushes and commits), SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running(workers: list[Worker]) -> Iterator[list[Worker]]:
    """Workers that are stopped however the block ends (never left behind)."""
    try:
        yield workers
    finally:
        for w in workers:
            if w.proc.poll() is None:
                os.kill(w.pid, signal.SIGKILL)
                w.proc.wait()


def pg_catalog(b: Bench, collection: str, partitions: int, task: str, table: str) -> Catalog:
    return b.catalog({
        "collections": {collection: b.raw_collection(partitions)},
        "materializations": {task: {
            "endpoint": {"postgres": {"url": "${POSTGRES_URL}", "schema": PG_SCHEMA}},
            "bindings": [{"source": collection, "resource": {"table": table}}],
        }},
    })


class Checkpoints:
    """Reads a postgres materialization's checkpoint rows: assignment (fences) and durable progress."""

    def __init__(self, conn: asyncpg.Connection, task: str, partitions: int) -> None:
        self.conn = conn
        self.task = task
        self.partitions = partitions

    async def read(self) -> tuple[int, int, int]:
        """(partitions fenced, distinct holders, documents durably applied)."""
        try:
            row = await self.conn.fetchrow(
                f'SELECT count(*), count(DISTINCT holder), coalesce(sum(next_offset), 0) '
                f"FROM {pg_table('localflow_checkpoints')} WHERE materialization = $1", self.task)
        except asyncpg.UndefinedTableError:
            return 0, 0, 0
        return int(row[0]), int(row[1]), int(row[2])

    async def wait(self, workers: list[Worker], *, holders: int, applied: int, within: float,
                   interval: float = 0.02) -> tuple[float, int]:
        """Poll until every partition is fenced by ``holders`` workers and ``applied`` documents
        are durable (0: don't wait for documents); (epoch time, documents applied) then."""
        deadline = time.monotonic() + within
        while True:
            fenced, held_by, done = await self.read()
            if fenced == self.partitions and held_by >= holders and done >= applied:
                return time.time(), done
            for w in workers:
                w.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.task}: after {within:.0f} s, {fenced}/{self.partitions} partitions "
                                 f"fenced by {held_by} worker(s), {done}/{applied} documents applied")
            await asyncio.sleep(interval)  # polling the checkpoint table, with a deadline


async def fill(b: Bench, collection: str, partitions: int, n: int) -> None:
    """Produce ``n`` raw documents into a collection's topic, 50,000 at a time (bounded memory)."""
    for part in chunks(range(n), 50_000):
        docs = sophia_docs(len(part), seed=part[0])
        ids = [f"rec-{i:08d}" for i in part]
        for d, id_ in zip(docs, ids, strict=True):
            d["metadata"]["id"] = id_
        headers = Collection(collection, RAW_SCHEMA, RAW_KEY, partitions).headers("bench/capture")
        await b.produce(topic_of(collection), partitions, [orjson.dumps([i]) for i in ids],
                        [orjson.dumps(d) for d in docs], headers)


async def expect_rows(conn: asyncpg.Connection, table: str, n: int) -> None:
    count = await conn.fetchval(f"SELECT count(*) FROM {pg_table(table)}")
    if count != n:
        raise BenchError(f"Postgres table {pg_table(table)} has {count} rows, expected {n}")


async def _drop(conn: asyncpg.Connection, table: str) -> None:
    await conn.execute(f"DROP TABLE IF EXISTS {pg_table(table)}")


# ---------------------------------------------------------------------------- memory


async def memory(b: Bench) -> list[Row]:
    """Peak RSS of a postgres materialization worker while a backlog of ``sizes.backlog`` drains."""
    n = b.sizes.backlog
    collection = f"bench/{b.name('backlog')}"
    await fill(b, collection, 3, n)
    conn = await asyncpg.connect(b.services.postgres.url)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {pg_ident(PG_SCHEMA)}")
    task, table = f"bench/{b.name('pg_mem')}", b.name("pg_mem")
    cat = pg_catalog(b, collection, 3, task, table)
    samples: list[int] = []
    try:
        with running([Worker(b, cat, [task], "memory")]) as workers:
            worker = workers[0]
            checkpoints = Checkpoints(conn, task, 3)

            async def sample() -> None:
                while True:
                    samples.append(worker.status_kib("VmRSS"))
                    await asyncio.sleep(0.2)  # RSS sampling period

            sampler = asyncio.create_task(sample())
            try:
                started, _ = await checkpoints.wait(workers, holders=1, applied=0, within=120)
                cpu = tree_cpu()
                finished, _ = await checkpoints.wait(workers, holders=1, applied=n, within=600, interval=0.2)
                cpu = tree_cpu() - cpu
                peak = worker.status_kib("VmHWM")
            finally:
                sampler.cancel()
            await worker.stop()
        await expect_rows(conn, table, n)
    finally:
        await _drop(conn, table)
        await conn.close()
    drain = Sample(n, finished - started, cpu)
    return [
        Row("memory: worker peak RSS", "MiB", peak / 1024, target="< 256 MiB", met=peak / 1024 < 256,
            runs={"rss_mib_samples_max": [round(max(samples, default=0) / 1024, 1)],
                  "rss_mib_median": [round(statistics.median(samples) / 1024, 1) if samples else 0]},
            note=f"VmHWM of a `python -m pipeline run` postgres worker draining {n:,} documents "
                 f"(3 partitions, ~300 bytes each)"),
        Row("memory: backlog drain rate", "docs/s", drain.rate,
            runs={"seconds": [round(drain.seconds, 2)], "cpu_seconds": [round(drain.cpu, 2)]},
            note="same run: from the worker's assignment until every document is durable in Postgres"),
    ]


# ---------------------------------------------------------------------------- scaling


SCALING = ((1, 1), (3, 1), (6, 1), (6, 2))
"""(partitions, workers) of each scaling run."""


async def scaling(b: Bench) -> list[Row]:
    """Throughput of the postgres materialization at 1, 3 and 6 partitions, and with 2 workers."""
    n = b.sizes.scaling_docs
    conn = await asyncpg.connect(b.services.postgres.url)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {pg_ident(PG_SCHEMA)}")
    rows: list[Row] = []
    try:
        for partitions, count in SCALING:
            sample = await _scaling_run(b, conn, partitions, count, n)
            rows.append(Row(f"scaling: {partitions} partition(s) x {count} worker(s)", "docs/s", sample.rate,
                            runs={"seconds": [round(sample.seconds, 2)], "cpu_seconds": [round(sample.cpu, 2)]}))
    finally:
        await conn.close()
    base = rows[0].localflow or 1
    for r in rows:
        r.note = f"{r.localflow / base:.2f}x the 1-partition rate"
    return rows


async def _scaling_run(b: Bench, conn: asyncpg.Connection, partitions: int, count: int, n: int) -> Sample:
    """``count`` workers of one materialization drain ``n`` documents, all of them working from the start.

    The workers start on an empty collection; once every partition is fenced and the group has
    settled (each worker holds its share), they are paused (SIGSTOP, well within the consumer
    session timeout), the documents are produced, and the clock starts as they are resumed. So
    a worker that joined the group first never gets a head start over the others.
    """
    collection = f"bench/{b.name(f'scale{partitions}')}"
    task, table = f"bench/{b.name('pg_scale')}", b.name("pg_scale")
    await b.create_topic(topic_of(collection), partitions)
    cat = pg_catalog(b, collection, partitions, task, table)
    checkpoints = Checkpoints(conn, task, partitions)
    try:
        with running([Worker(b, cat, [task], f"scale_{partitions}_{count}_{i}") for i in range(count)]) as workers:
            await checkpoints.wait(workers, holders=count, applied=0, within=120)
            sample = await paused_drain(b, workers, checkpoints, collection, partitions, n, table=table, within=300)
        await expect_rows(conn, table, n)
    finally:
        await _drop(conn, table)
    return sample


async def paused_drain(b: Bench, workers: list[Worker], checkpoints: Checkpoints, collection: str, partitions: int,
                       n: int, *, table: str, within: float) -> Sample:
    """Pause the settled workers, produce ``n`` documents, resume them as the clock starts, and time
    them until every document is durable and ``table`` holds its ``n`` rows; then stop them (they
    flush and commit).

    Both, because a derivation between the two may write a key twice (at least once, by design: a
    rebalance re-derives what was not committed), so the materialization's stored offsets can reach
    ``n`` before the last keys arrive."""
    for w in workers:
        os.kill(w.pid, signal.SIGSTOP)
    try:
        await fill(b, collection, partitions, n)
    finally:
        cpu, started = tree_cpu(), time.time()
        for w in workers:
            os.kill(w.pid, signal.SIGCONT)
    deadline = time.monotonic() + within
    await checkpoints.wait(workers, holders=len(workers), applied=n, within=within)
    while (rows := await checkpoints.conn.fetchval(f"SELECT count(*) FROM {pg_table(table)}")) < n:
        for w in workers:
            w.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"Postgres table {pg_table(table)} has {rows} of {n} rows after {within:.0f} s")
        await asyncio.sleep(0.02)  # polling the table, with a deadline
    finished = time.time()
    cpu = tree_cpu() - cpu
    for w in workers:
        await w.stop()
    return Sample(n, finished - started, cpu)
