"""The fault trials' pipeline: the whole Sophia flow on private servers, what a trial does, and
the table of trials (printed, written to a file, summarised at the session end).

Shared by the fault modules (test_faults*.py). Each module opens its own pipeline in a
module-scoped fixture, so `make test` (a module per worker) runs the modules side by side.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pipeline.embedded.services import Services
from tests.support.census import Census
from tests.support.judge import Expected, Verdict, settle
from tests.support.pipeline import TASKS, Pipeline, pipeline_env, sophia_catalog
from tests.support.sources import AgentLogs, FaultProxy, SourceServer, api_records
from tests.support.waiting import wait_for_async

SEED = int(os.environ.get("LOCALFLOW_CHAOS_SEED") or time.time_ns() % 1_000_000)
"""Random points of the kill trials; set LOCALFLOW_CHAOS_SEED to replay a run (it is in the table)."""
CHAOS_ROUNDS = int(os.environ.get("LOCALFLOW_CHAOS_ROUNDS", "6"))


@dataclass
class Sophia:
    """The running pipeline, its sources and servers, and what the sources produced so far."""

    infra: Services
    """The broker (durable on its own moto when the trials restart it)."""
    ends: Services
    """Postgres, Redis and the archive's moto (reached through ``proxy``)."""
    sources: SourceServer
    proxy: FaultProxy
    logs: AgentLogs
    pipeline: Pipeline
    census: Census
    table: FaultTable
    rng: random.Random
    expected: Expected = field(default_factory=Expected)
    fed: int = 0
    _batch: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, records: int = 20, lines: int = 20, *, without_id: int = 0, refused: int = 0,
             too_long: int = 0, nul: int = 0) -> None:
        """New API records and log lines (and bad ones); safe from a feeding thread."""
        with self._lock:
            self._batch += 1
            prefix = f"b{self._batch}"
            recs = api_records(prefix, records, self.rng)
            recs += [{"type": "user_query", "note": f"{prefix}: a record without id ({i})"} for i in range(without_id)]
            nul_ids = [f"{prefix}-nul-{i}" for i in range(refused)]
            recs += [{"id": i, "type": "system_event", "note": "a NUL \u0000 Postgres cannot hold"} for i in nul_ids]
            self.sources.add_records(recs)
            seqs = self.logs.write(lines, too_long=too_long, nul=nul)
            e = self.expected
            e.api_ids |= {r["id"] for r in recs if "id" in r}
            e.api_without_id += without_id
            e.api_refused |= set(nul_ids)
            e.log_lines |= set(seqs)
            e.log_too_long += too_long
            e.log_refused = set(self.logs.refused)
            self.fed += len(recs) + len(seqs) + too_long

    @contextlib.contextmanager
    def feeding(self, every: float = 0.25, records: int = 3, lines: int = 3) -> Iterator[None]:
        """Feed continuously (a thread) while the block runs: faults happen mid-stream."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(every):  # the feeding rate, not a wait for a condition
                self.feed(records, lines)

        thread = threading.Thread(target=run, name="feeder", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)

    async def trial(self, kind: str, fault: str, fed_before: int, *, within: float = 240) -> Verdict:
        """Settle, judge, record a table row; fail the test unless nothing was lost or doubled."""
        self.pipeline.ensure_running()
        verdict, seconds = await settle(self.census, self.expected, within=within)
        exits = self.pipeline.unexpected_exits()
        if exits:
            verdict.problems.append(f"task processes exited by themselves: {exits}")
        self.table.add(kind, fault, self.fed - fed_before, verdict, seconds)
        print(f"\n{self.table.render()}\n")
        assert verdict.ok, "\n".join(verdict.problems) + f"\nworker logs: {self.pipeline.tasks[TASKS[0]].logs}"
        return verdict

    def log_of(self, task: str) -> str:
        """The current incarnation's log of a task."""
        return self.pipeline.tasks[task].output(all_runs=False)

    async def noticed(self, task: str, text: str, fault: Callable[[], None]) -> None:
        """Inject ``fault``, then wait until ``task`` logs ``text`` once more than before it."""
        before = self.log_of(task).count(text)
        fault()
        await wait_for_async(lambda: self.log_of(task).count(text) > before, timeout=60,
                             message=f"{task} to log {text!r}")


@dataclass
class Row:
    trial: int
    kind: str
    fault: str
    new_records: int
    verdict: Verdict
    seconds: float


class FaultTable:
    """Trials, their faults and results: printed, written to a file, summarised at the session end."""

    columns = ("#", "kind", "fault", "new", "sources", "keys", "resent", "postgres rows+dead/keys",
               "redis keys+dead/keys", "s3 docs+dead/docs", "lost", "doubled", "result", "s")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[Row] = []

    def add(self, kind: str, fault: str, new_records: int, verdict: Verdict, seconds: float) -> Row:
        row = Row(len(self.rows) + 1, kind, fault, new_records, verdict, seconds)
        self.rows.append(row)
        self.path.write_text(self.render() + "\n")
        return row

    def cells(self, row: Row) -> list[str]:
        v = row.verdict

        def ep(t: tuple[int, int, int]) -> str:
            return f"{t[0]}+{t[1]}/{t[2]}"

        return [str(row.trial), row.kind, row.fault, str(row.new_records), str(v.source_records), str(v.keys),
                str(v.resent), ep(v.pg), ep(v.redis), ep(v.s3), str(v.lost), str(v.doubled),
                "ok" if v.ok else "FAIL", f"{row.seconds:.0f}"]

    def render(self) -> str:
        table = [list(self.columns)] + [self.cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(self.columns))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in self.rows:
            for p in r.verdict.problems:
                lines.append(f"  trial {r.trial}: {p}")
        return "\n".join(lines)

    def summary(self) -> str:
        lost = sum(r.verdict.lost for r in self.rows)
        doubled = sum(r.verdict.doubled for r in self.rows)
        failed = sum(not r.verdict.ok for r in self.rows)
        kinds = len({r.kind for r in self.rows})
        return (f"fault injection: {len(self.rows)} trials of {kinds} kinds, {lost} lost, {doubled} doubled, "
                f"{failed} failed (table: {self.path})")


class TableReport:
    """A pytest plugin object that prints the fault table in the terminal summary."""

    def __init__(self, table: FaultTable) -> None:
        self.table = table

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.table.rows:
            terminalreporter.section("localflow fault injection")
            terminalreporter.write_line(self.table.render())
            terminalreporter.write_line(self.table.summary())


@contextlib.asynccontextmanager
async def open_sophia(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
                      *, durable_broker: bool = False,
                      workers: Callable[[Path, dict[str, str], Path], Pipeline] | None = None) -> AsyncIterator[Sophia]:
    """The whole pipeline on private servers, for one module's trials (each test is one trial).

    Its servers are that module's own (not the session's): the trials kill and restart them.
    ``workers(catalog, env, logs)`` makes the processes (default: one per task).
    """
    tmp = tmp_path_factory.mktemp("faults")
    # Tansu on S3 storage polls its bucket all the time (a moto busy at a fifth of a core): only the
    # trials that restart the broker pay for it.
    infra = Services(kafka=True, postgres=False, redis=False, s3=durable_broker, durable_kafka=durable_broker)
    ends = Services(kafka=False, postgres=True, redis=True, s3=True)
    sources: SourceServer | None = None
    pipeline: Pipeline | None = None
    try:
        infra.start()
        ends.start()
        sources = SourceServer(token="sophia-api-token-for-faults")
        proxy = FaultProxy(sources.loop, "127.0.0.1", ends.s3.port)
        logs = AgentLogs(tmp / "agents")
        env = pipeline_env(ends, sources, logs.directory, kafka=infra.kafka.bootstrap_servers, s3_endpoint=proxy.url)
        pipeline = (workers or Pipeline)(sophia_catalog(tmp / "flow.yaml"), env, tmp / "logs")
        table = FaultTable(tmp_path_factory.getbasetemp() / "fault-table.txt")
        request.config.pluginmanager.register(TableReport(table), f"localflow-fault-table-{id(table)}")
        census = Census(infra.kafka.bootstrap_servers, ends.postgres.url, ends.redis.url, ends.s3.endpoint_url)
        pipeline.start()
        yield Sophia(infra, ends, sources, proxy, logs, pipeline, census, table, random.Random(SEED))
    finally:  # every step runs even when one before it fails (in reverse order of these lines)
        with contextlib.ExitStack() as teardown:
            teardown.callback(infra.stop)
            teardown.callback(ends.stop)
            if sources is not None:
                teardown.callback(sources.close)
            if pipeline is not None:
                teardown.callback(pipeline.stop)


def bad_input(s: Sophia) -> None:
    """The dead-letter makers of every trial: no id, Postgres-refused values, an over-long line."""
    s.feed(5, 5, without_id=1, refused=1, too_long=1, nul=1)


async def _rows(s: Sophia) -> int:
    """Rows of the agent log table now (0 while it does not exist or Postgres is away)."""
    try:
        conn = await asyncpg.connect(s.ends.postgres.url, timeout=10)
    except (OSError, asyncpg.PostgresError):
        return 0
    try:
        return int(await conn.fetchval("SELECT count(*) FROM estuary.sophia_agent_logs"))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def _wait_rows(s: Sophia, condition: Callable[[int], bool], message: str) -> None:
    async def holds() -> bool:
        return condition(await _rows(s))

    await wait_for_async(holds, timeout=120, message=message)


def pipeline_fixture(*, durable_broker: bool = False) -> Any:
    """A module's `sophia` fixture: its own pipeline for its trials (`sophia = pipeline_fixture()`)."""

    @pytest.fixture(scope="module")
    async def sophia(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> AsyncIterator[Sophia]:
        async with open_sophia(tmp_path_factory, request, durable_broker=durable_broker) as running:
            yield running

    return sophia
