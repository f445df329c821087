"""`localflow preview` and `localflow status`: what an operator reads off a running pipeline."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

import orjson

from tests.support.cli import DOC_SCHEMA, cli_env, command, localflow, worker, write_catalog
from tests.support.waiting import wait_for, wait_for_async
from tests.support.writing import produce


def redis_catalog(tmp_path: Path, name: str, redis_url: str) -> Path:
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{name}/events": {"schema": DOC_SCHEMA, "key": ["/id"], "partitions": 3}},
        "materializations": {f"{name}/cache": {
            "endpoint": {"redis": {"url": redis_url, "advanced": {"state_prefix": f"{name}:"}}},
            "bindings": [{"source": f"{name}/events", "resource": {"key": f"{name}:{{/id}}"}}]}},
    })


# ------------------------------------------------------------------------------------- preview

async def test_preview_from_the_beginning_prints_every_document_as_a_json_line_and_exits(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    docs = [{"id": f"k{i}", "n": i} for i in range(50)]
    await produce(catalog, f"{name}/events", docs)

    result = localflow("preview", f"{name}/events", "--catalog", str(catalog), "--from-beginning")

    assert result.returncode == 0, result.stderr
    printed = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert sorted(printed, key=lambda d: d["n"]) == docs


async def test_preview_limit_stops_after_that_many_documents(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    await produce(catalog, f"{name}/events", [{"id": f"k{i}", "n": i} for i in range(50)])
    result = localflow("preview", f"{name}/events", "-c", str(catalog), "--from-beginning", "--limit", "7")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 7


async def test_preview_without_from_beginning_prints_only_documents_written_after_it_started(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    await produce(catalog, f"{name}/events", [{"id": f"old{i}", "n": i} for i in range(20)])
    err, out = tmp_path / "preview.err", tmp_path / "preview.out"
    with command("preview", f"{name}/events", "-c", str(catalog), "--limit", "3", log=err, stdout=out) as proc:
        wait_for(lambda: "waiting for new documents" in err.read_text(), timeout=30, message="preview to start")
        await produce(catalog, f"{name}/events", [{"id": f"new{i}", "n": i} for i in range(3)])
        assert proc.wait(timeout=30) == 0
    assert sorted(orjson.loads(line)["id"] for line in out.read_text().splitlines()) == ["new0", "new1", "new2"]


def test_preview_of_an_unknown_collection_exits_2_listing_the_collections(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    result = localflow("preview", "nope/none", "-c", str(catalog))
    assert result.returncode == 2
    assert f"collections: {name}/events" in result.stderr


async def test_preview_takes_the_catalog_first_and_still_accepts_the_deprecated_catalog_option(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": kafka_bootstrap},
        "collections": {f"{name}/events": {"schema": DOC_SCHEMA, "key": ["/id"]}}})
    docs = [{"id": f"k{i}", "n": i} for i in range(5)]
    await produce(catalog, f"{name}/events", docs)

    first = localflow("preview", str(catalog), f"{name}/events", "--from-beginning")
    old = localflow("preview", f"{name}/events", "--catalog", str(catalog), "--from-beginning")

    for result in (first, old):
        assert result.returncode == 0, result.stderr
        assert sorted((orjson.loads(line) for line in result.stdout.splitlines()), key=lambda d: d["n"]) == docs
    assert "deprecated" not in first.stderr
    assert (f"warning: `preview COLLECTION --catalog FILE` is deprecated; write: localflow preview {catalog} "
            f"{name}/events") in old.stderr.splitlines()


# -------------------------------------------------------------------------------------- status

def partition_rows(out: str, collection: str) -> dict[int, tuple[int, str, int]]:
    """partition -> (end, checkpoint, lag) from the status table."""
    rows = {}
    for line in out.splitlines():
        m = re.match(rf"\s*{re.escape(collection)}\s+(\d+)\s+(\d+)\s+(\S+)\s+([\d,]+)\s*$", line)
        if m:
            rows[int(m.group(1))] = (int(m.group(2)), m.group(3), int(m.group(4).replace(",", "")))
    return rows


async def test_status_shows_the_worker_running_and_lag_per_partition_from_committed_checkpoints(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    collection, task = f"{name}/events", f"{name}/cache"
    await produce(catalog, collection, [{"id": f"k{i}", "n": i} for i in range(90)])

    with worker(catalog, "--metrics-port", "0", log=tmp_path / "run.log") as w:
        url = w.url()

        line = re.compile(rf"{re.escape(task)} \(materialization\) · running on 1 worker · [\d.,]+ docs/s · "
                          r"checkpoint \d+s ago")

        def caught_up() -> str | None:
            # Redis holds a batch's checkpoint as soon as it is applied; the worker (overlapping its
            # batches) reports it durable at its next poll: wait for both, not the first of them.
            result = localflow("status", str(catalog), "--worker", url)
            rows = partition_rows(result.stdout, collection)
            done = len(rows) == 3 and all(lag == 0 for _, _, lag in rows.values()) and line.search(result.stdout)
            return result.stdout if done else None

        out = wait_for(caught_up, timeout=60, interval=0.5,
                       message="status to show lag 0 on 3 partitions and the worker's checkpoint")
        assert sum(end for end, _, _ in partition_rows(out, collection).values()) == 90
        assert "no error" in out
        assert w.stop() == 0

    await produce(catalog, collection, [{"id": f"late{i}", "n": i} for i in range(10)])
    result = localflow("status", str(catalog), "--worker", url)
    assert result.returncode == 1, "a worker did not answer"
    assert f"{task} (materialization) · not running" in result.stdout
    assert f"worker {url} did not answer /status" in result.stdout
    rows = partition_rows(result.stdout, collection)
    assert sum(lag for _, _, lag in rows.values()) == 10
    assert all(int(checkpoint) + lag == end for end, checkpoint, lag in rows.values())


async def test_status_without_workers_says_running_is_unknown_and_a_new_group_has_no_checkpoint(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    await produce(catalog, f"{name}/events", [{"id": f"k{i}", "n": i} for i in range(30)])
    result = localflow("status", str(catalog), env=cli_env(LOCALFLOW_WORKERS=""))
    assert result.returncode == 0, result.stderr
    assert "no live worker in localflow.workers (workers register when run with --metrics-port)" in result.stdout
    assert f"{name}/cache (materialization) · running: unknown ·" in result.stdout
    rows = partition_rows(result.stdout, f"{name}/events")
    assert [checkpoint for _, checkpoint, _ in rows.values()] == ["none"] * 3
    assert sum(lag for _, _, lag in rows.values()) == 30


async def test_status_watch_refreshes_until_interrupted(
        tmp_path: Path, services_env: dict[str, str], redis_url: str, unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name, redis_url)
    await produce(catalog, f"{name}/events", [{"id": "k", "n": 1}])
    out = tmp_path / "watch.out"
    with command("status", str(catalog), "--watch", "--interval", "0.2", log=out) as proc:
        await wait_for_async(lambda: out.read_text().count(f"{name}/cache (materialization)") >= 1, timeout=30,
                             message="a first status table")
        proc.send(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, out.read_text()
