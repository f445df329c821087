"""`localflow run`: signals, shutdown, metrics, health, readiness and logs of a worker process."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import pipeline.telemetry.metrics  # noqa: F401 - registers every metric, to compare with a scrape
from pipeline.embedded.services import free_port
from pipeline.runtime.catalog import load_catalog
from pipeline.runtime.collection import Collection, read_to_end
from tests.support.cli import DOC_SCHEMA, localflow, worker, write_catalog
from tests.support.waiting import wait_for, wait_for_async
from tests.support.workers import Worker
from tests.support.writing import produce

RAW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timestamp": {"type": "string", "format": "date-time"}, "source": {"type": "string"},
                   "data": {"type": "object"},
                   "metadata": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
    "required": ["timestamp", "source", "data", "metadata"],
}


def files_catalog(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    """A catalog whose one task tails ``*.log`` in a fresh directory: (catalog, directory, collection)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    collection = f"{name}/lines"
    path = write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {collection: {"schema": RAW_SCHEMA, "key": ["/metadata/id"], "partitions": 2}},
        "captures": {f"{name}/tail": {"interval": "1s", "endpoint": {"files": {"directory": str(logs)}},
                                      "bindings": [{"target": collection, "resource": {"globs": ["*.log"]}}]}},
    })
    return path, logs, collection


def append_lines(file: Path, start: int, count: int) -> None:
    with file.open("a") as f:
        f.writelines(f'{{"seq": {i}}}\n' for i in range(start, start + count))


async def documents(catalog: Path, collection: str) -> list[dict[str, Any]]:
    cat = load_catalog(catalog)
    return [r.doc for r in await read_to_end(cat.kafka, Collection.from_catalog(cat, collection).topic)]


async def test_sigterm_exits_0_and_a_restart_resumes_without_losing_or_repeating_lines(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    catalog, logs, collection = files_catalog(tmp_path, unique_name())
    append_lines(logs / "agent.log", 0, 200)
    with worker(catalog, log=tmp_path / "run1.log") as w:
        await wait_for_async(lambda: _count(catalog, collection, 200), timeout=60, message="200 lines captured")
        assert w.stop(signal.SIGTERM) == 0, w.output()
    assert "all tasks stopped; checkpoints committed" in w.output()

    append_lines(logs / "agent.log", 200, 100)
    with worker(catalog, log=tmp_path / "run2.log") as w:
        await wait_for_async(lambda: _count(catalog, collection, 300), timeout=60, message="300 lines captured")
        assert w.stop(signal.SIGTERM) == 0, w.output()
    seqs = sorted(d["data"]["seq"] for d in await documents(catalog, collection))
    assert seqs == list(range(300)), "each line exactly once across the restart"


async def _count(catalog: Path, collection: str, expected: int) -> bool:
    return len(await documents(catalog, collection)) >= expected


async def test_metrics_endpoint_lists_every_localflow_metric_and_counts_documents(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    catalog, logs, collection = files_catalog(tmp_path, unique_name())
    append_lines(logs / "agent.log", 0, 20)
    task = collection.replace("/lines", "/tail")
    with worker(catalog, "--metrics-port", "0", log=tmp_path / "run.log") as w:
        url = w.url()
        await wait_for_async(lambda: _count(catalog, collection, 20), timeout=60, message="20 lines captured")
        async with httpx.AsyncClient() as client:
            scrape = (await client.get(f"{url}/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    expected = {f.name for f in REGISTRY.collect() if f.name.startswith("localflow_")}
    assert expected - set(families) == set()
    out = {(s.labels["task"], s.labels["collection"]): s.value for s in families["localflow_output_documents"].samples
           if s.name == "localflow_output_documents_total"}
    assert out[(task, collection)] == 20
    up = {s.labels["task"]: s.value for s in families["localflow_task_up"].samples}
    assert up == {task: 1.0}


def test_healthz_answers_and_readyz_turns_ready_once_the_task_is_connected(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    catalog, _, collection = files_catalog(tmp_path, unique_name())
    with worker(catalog, "--metrics-port", "0", log=tmp_path / "run.log") as w:
        url = w.url()
        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=60,
                         message="/readyz to answer 200")
        assert ready
        assert httpx.get(f"{url}/readyz").json() == {"ready": True,
                                                    "tasks": {collection.replace("/lines", "/tail"): "ok"}}


def test_readyz_is_503_and_says_why_while_a_task_cannot_reach_its_endpoint(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{name}/docs": {"schema": DOC_SCHEMA, "key": ["/id"]}},
        "materializations": {f"{name}/cache": {
            "endpoint": {"redis": {"url": f"redis://127.0.0.1:{free_port()}/0",
                                   "advanced": {"connect_timeout": "1s", "retry": {"give_up_after": "1s"}}}},
            "bindings": [{"source": f"{name}/docs", "resource": {"key": "k:{/id}"}}]}},
    })
    with worker(catalog, "--metrics-port", "0", log=tmp_path / "run.log") as w:
        url = w.url()
        answer = httpx.get(f"{url}/readyz")
        assert answer.status_code == 503
        reason = answer.json()["tasks"][f"{name}/cache"]
        assert reason != "ok"
        assert httpx.get(f"{url}/healthz").status_code == 200, "alive even when not ready"


async def test_json_logs_are_one_object_per_line_each_naming_its_task(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    catalog, logs, collection = files_catalog(tmp_path, unique_name())
    append_lines(logs / "agent.log", 0, 5)
    with worker(catalog, "--log-format", "json", log=tmp_path / "run.log") as w:
        await wait_for_async(lambda: _count(catalog, collection, 5), timeout=60, message="5 lines captured")
        assert w.stop() == 0
    records = [orjson.loads(line) for line in w.output().splitlines()]
    assert records and all(r["task"] for r in records)
    task = collection.replace("/lines", "/tail")
    assert any(r["task"] == task and "capture started" in r["message"] for r in records)
    assert any(r["task"] == "main" and "received SIGTERM" in r["message"] for r in records)


def test_an_unknown_task_exits_2_naming_the_tasks_of_the_catalog(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    catalog, _, collection = files_catalog(tmp_path, unique_name())
    result = localflow("run", str(catalog), "--task", "nope/none")
    assert result.returncode == 2
    assert "'nope/none' is not a task of the catalog" in result.stderr
    assert collection.replace("/lines", "/tail") in result.stderr


# ------------------------------------------------------------------ a task that does not stop in time

@contextmanager
def worker_stuck_in_a_request(tmp_path: Path, name: str, shutdown_timeout: str) -> Iterator[Worker]:
    """`localflow run` of an http capture whose request hangs: the API accepts it and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as api:
        api.bind(("127.0.0.1", 0))
        api.listen(8)
        api.settimeout(0.2)
        catalog = write_catalog(tmp_path / "flow.yaml", {
            "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
            "collections": {f"{name}/raw": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
            "captures": {f"{name}/api": {
                "endpoint": {"http": {"url": f"http://127.0.0.1:{api.getsockname()[1]}/records", "timeout": "2m"}},
                "bindings": [{"target": f"{name}/raw", "resource": {"id": "/id"}}]}},
        })

        def request_in_flight() -> socket.socket | None:
            try:
                return api.accept()[0]
            except TimeoutError:
                return None

        with worker(catalog, "--shutdown-timeout", shutdown_timeout, log=tmp_path / "run.log") as w:
            with wait_for(request_in_flight, timeout=60, message="the capture's request"):
                yield w


def test_a_task_that_does_not_stop_within_the_shutdown_timeout_exits_1_naming_it(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    with worker_stuck_in_a_request(tmp_path, name, "1") as w:
        assert w.stop(signal.SIGTERM, timeout=30) == 1
    assert f"task(s) {name}/api did not stop" in w.output()


def test_sigterm_abandons_a_hung_poll_after_its_grace_and_exits_0(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    with worker_stuck_in_a_request(tmp_path, unique_name(), "30") as w:
        assert w.stop(signal.SIGTERM, timeout=25) == 0
    assert "abandoned a poll still in flight" in w.output()


def test_a_second_signal_exits_at_once(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    with worker_stuck_in_a_request(tmp_path, unique_name(), "120") as w:
        w.send(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in w.output(), timeout=30, message="the first signal logged")
        assert w.stop(signal.SIGINT, timeout=10) == 128 + signal.SIGINT
    assert "received SIGINT again: exiting at once" in w.output()


# ------------------------------------------------------------------ SIGTERM during a Postgres batch

DOCS = 100_000


async def test_sigterm_during_a_busy_postgres_batch_loses_and_doubles_nothing(
        tmp_path: Path, services_env: dict[str, str], postgres_url: str, unique_name: Callable[..., str]) -> None:
    """Append-only table (delta updates): a document applied twice would be two rows."""
    name, schema = unique_name(), unique_name("s")
    collection, task = f"{name}/events", f"{name}/pg"
    catalog = write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {collection: {"schema": DOC_SCHEMA, "key": ["/id"], "partitions": 3}},
        "materializations": {task: {
            "endpoint": {"postgres": {"url": "${POSTGRES_URL}", "schema": schema}},
            "bindings": [{"source": collection, "resource": {"table": "events", "delta_updates": True}}]}},
    })
    await produce(catalog, collection, [{"id": f"k{i}", "n": i} for i in range(DOCS)])
    conn = await asyncpg.connect(postgres_url)
    try:
        async def rows() -> int:
            return await conn.fetchval(f'SELECT count(*) FROM "{schema}".events')

        with worker(catalog, log=tmp_path / "run1.log") as w:
            await wait_for_async(rows, timeout=90, ignore=(asyncpg.UndefinedTableError,),
                                 message="the first rows")
            assert w.stop(signal.SIGTERM) == 0, w.output()
        at_stop = await rows()
        assert 0 < at_stop < DOCS, "SIGTERM came while documents were still being applied"
        checkpointed = await conn.fetchval(
            f'SELECT sum(next_offset) FROM "{schema}".localflow_checkpoints WHERE materialization = $1', task)
        assert at_stop == checkpointed, "rows applied and offsets committed together at shutdown"

        with worker(catalog, log=tmp_path / "run2.log") as w:
            await wait_for_async(lambda: _rows_at_least(rows, DOCS), timeout=120, message=f"{DOCS} rows")
            assert w.stop(signal.SIGTERM) == 0, w.output()
        assert await rows() == DOCS, "no document applied twice"
        distinct = await conn.fetchval(f'SELECT count(DISTINCT id) FROM "{schema}".events')
        assert distinct == DOCS, "no document lost"
    finally:
        await conn.close()


async def _rows_at_least(rows: Callable[[], Any], n: int) -> bool:
    return await rows() >= n
