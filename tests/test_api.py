"""The control plane against a real `localflow run`: the seed's client calls, persistence in the
config topic, several workers, 422 with `validate`'s messages, and `localflow export`.

Every test has a config topic of its own (LOCALFLOW_CONFIG_TOPIC), so tasks one test creates
are never seen by another.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml
from openapi_spec_validator import validate

from pipeline.control.client import LocalflowClient
from pipeline.embedded.services import free_port
from pipeline.runtime.catalog import load_catalog
from pipeline.runtime.collection import read_to_end
from tests.support.api import RAW_SCHEMA, Source, api_url, api_worker
from tests.support.cli import cli_env, localflow, worker, write_catalog
from tests.support.waiting import wait_for, wait_for_async

SOPHIA = Path(__file__).resolve().parent.parent / "examples/sophia/flow.yaml"


@dataclass
class Deployment:
    """One test's deployment: a name prefix, its catalog (three collections) and its environment
    (the session broker, a config topic of its own)."""

    prefix: str
    catalog: Path
    env: dict[str, str]


@pytest.fixture
def deployment(tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> Deployment:
    prefix = unique_name()
    return Deployment(prefix, three_collections(tmp_path, prefix),
                      {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LOCALFLOW_CONFIG_TOPIC": f"{prefix}.config"})


def three_collections(tmp_path: Path, prefix: str) -> Path:
    """A catalog of three collections and no task: the tasks come through the API."""
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{prefix}/{c}": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}
                        for c in ("raw", "logs", "metrics")},
    })


async def test_the_seeds_example_calls_work_and_the_created_capture_reaches_postgres(
        tmp_path: Path, deployment: Deployment, postgres_url: str, unique_name: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = deployment.prefix
    async with Source(prefix) as source:
        with api_worker(deployment.catalog, tmp_path / "run.log", **deployment.env) as (w, url):
            monkeypatch.setenv("LOCALFLOW_API_URL", url)
            # The seed's "API Usage" example, verbatim but for the import and the endpoint's URL.
            from pipeline.control.client import EstuaryClient

            async def main():
                async with EstuaryClient() as client:
                    # Health check
                    health = await client.health_check()
                    print(f"Status: {health['status']}")

                    # List collections
                    collections = await client.list_collections()
                    print(f"Collections: {collections['count']}")

                    # Create capture
                    result = await client.create_capture(
                        "my_capture",
                        {"endpoint": f"{source.url}/data"}
                    )
                    print(f"Capture created: {result['success']}")

            await main()
            assert capsys.readouterr().out.splitlines() == [
                "Status: healthy", "Collections: 3", "Capture created: True"]

            pg_schema = unique_name("s")
            async with LocalflowClient() as client:
                made = await client.create_materialization(f"{prefix}/pg", {
                    "endpoint": {"postgres": {"url": postgres_url, "schema": pg_schema}},
                    "bindings": [{"source": "my_capture", "resource": {"table": "my_capture"}}]})
                assert made["success"], made
                capture = await client.task_status("my_capture")
                assert (capture["kind"], capture["origin"], capture["state"]) == ("capture", "api", "RUNNING")
                listed = await client.list_collections()
                assert listed["count"] == 4
                mine = next(c for c in listed["collections"] if c["name"] == "my_capture")
                assert (mine["key"], mine["origin"], mine["schema"]) == (["/metadata/id"], "api", RAW_SCHEMA)

            conn = await asyncpg.connect(postgres_url)
            try:
                async def rows() -> list[Any]:
                    try:
                        return await conn.fetch(f'SELECT * FROM "{pg_schema}".my_capture')
                    except asyncpg.UndefinedTableError:
                        return []

                found = await wait_for_async(rows, timeout=60, message="the capture's documents in Postgres")
            finally:
                await conn.close()
            assert source.hits["data"] >= 1
            assert any(f"{prefix}-data-1" in str(dict(r)) for r in found), found
            async with LocalflowClient() as client:
                async def caught_up() -> dict[str, Any] | None:
                    task = await client.task_status(f"{prefix}/pg")
                    return task if task["partitions"] and task["lag"] == 0 else None

                pg = await wait_for_async(caught_up, timeout=30, message="the materialization's lag to reach 0")
                assert [(p["collection"], p["partition"]) for p in pg["partitions"]] == [("my_capture", 0)]
                assert pg["partitions"][0]["checkpoint"] == pg["partitions"][0]["end"] >= 1
                assert (await client.delete("my_capture"))["success"]
                assert (await client.task_status("my_capture"))["status_code"] == 404
                assert "my_capture" in {c["name"] for c in (await client.list_collections())["collections"]}


async def test_tasks_created_through_the_api_are_seen_by_every_worker_and_survive_a_restart(
        tmp_path: Path, deployment: Deployment) -> None:
    prefix, catalog, env = deployment.prefix, deployment.catalog, deployment.env
    name = f"{prefix}/api_capture"
    async with Source(prefix) as source:
        with worker(catalog, "--api-port", "0", log=tmp_path / "a.log", env=cli_env(**env)) as wa, \
                worker(catalog, "--api-port", "0", log=tmp_path / "b.log", env=cli_env(**env)) as wb:
            async with LocalflowClient(api_url(wa)) as a, LocalflowClient(api_url(wb)) as b:
                made = await a.create_capture(name, {"endpoint": f"{source.url}/x", "interval": "1h",
                                                     "target": f"{prefix}/raw"})
                assert made["success"] and made["state"] == "RUNNING", made

                async def state_on_b() -> str:
                    return (await b.task_status(name)).get("state")

                assert await wait_for_async(lambda: _is(state_on_b, "RUNNING"), timeout=30,
                                            message="worker B to run the task created on A")

                async def captured() -> bool:
                    return bool(await read_to_end(load_catalog(catalog, env={**env}).kafka, f"{prefix}.raw"))

                # One of the two instances polls (the other is refused): the task really runs.
                await wait_for_async(captured, timeout=120, message="the capture created through the API to write")
                assert (await b.pause(name))["state"] == "PAUSED"
                assert await wait_for_async(lambda: _is(lambda: _state(a, name), "PAUSED"), timeout=30,
                                            message="worker A to see the pause made on B")
                assert (await a.resume(name))["state"] == "RUNNING"
                assert await wait_for_async(lambda: _is(state_on_b, "RUNNING"), timeout=30,
                                            message="worker B to see the resume made on A")
                assert (await b.restart(name))["success"]
                for w in (wa, wb):
                    wait_for(lambda w=w: f"stopping {name} (restart requested)" in w.output(), timeout=30,
                             message="every worker to restart the task")

        exported = localflow("export", str(catalog), env=cli_env(**env))
        assert exported.returncode == 0, exported.stderr
        assert yaml.safe_load(exported.stdout)["captures"][name]["endpoint"] == {"http": {"url": f"{source.url}/x"}}

        with api_worker(catalog, tmp_path / "c.log", "--task", name, **env) as (c_worker, url_c):
            async with LocalflowClient(url_c) as c:
                assert await wait_for_async(lambda: _is(lambda: _state(c, name), "RUNNING"), timeout=30,
                                            message="the task to run again after a restart")
                assert f"running 1 task(s): {name}" in c_worker.output()
                deleted = await c.delete(name)
                assert deleted["success"], deleted
                assert (await c.task_status(name))["status_code"] == 404
                refused = await c.delete(f"{prefix}/raw")
                assert refused["status_code"] == 404
    docs = await read_to_end(load_catalog(catalog, env={**env}).kafka, f"{prefix}.raw")
    assert docs, "the capture wrote nothing"


async def _state(client: LocalflowClient, name: str) -> str | None:
    return (await client.task_status(name)).get("state")


async def _is(get: Callable[[], Any], expected: str) -> bool:
    return await get() == expected


def _validate_lines(path: Path, env: dict[str, str]) -> list[str]:
    """`localflow validate`'s problem lines, without their position in ``path`` (a fragment has none)."""
    result = localflow("validate", str(path), env=cli_env(**env))
    assert result.returncode == 2, result.stdout
    lines = [ln.strip() for ln in result.stderr.splitlines()[1:] if ln.strip()]
    return [re.sub(rf"^{re.escape(str(path))}(:\d+:\d+)?: ", "", ln) for ln in lines]


async def test_an_invalid_fragment_gets_422_with_the_messages_validate_prints_and_changes_nothing(
        tmp_path: Path, deployment: Deployment) -> None:
    prefix, catalog, env = deployment.prefix, deployment.catalog, deployment.env
    fragment = {"interval": "30x", "endpoint": {"http": {"url": "ftp://nowhere", "colour": "blue"}},
                "bindings": [{"target": f"{prefix}/nope"}]}
    broken = yaml.safe_load(catalog.read_text())
    broken["captures"] = {f"{prefix}/bad": fragment}
    expected = _validate_lines(write_catalog(tmp_path / "broken.yaml", broken), env)
    with api_worker(catalog, tmp_path / "run.log", **env) as (_, url):
        async with LocalflowClient(url) as client:
            answer = await client.create_capture(f"{prefix}/bad", fragment)
            assert answer["status_code"] == 422 and answer["success"] is False
            assert answer["messages"] == expected
            assert any("interval" in m for m in answer["messages"])
            assert (await client.list_tasks())["count"] == 0
            assert (await client.health_check())["status"] == "healthy"

            bad_mat = await client.create_materialization(f"{prefix}/m", {"endpoint": {"nosuch": {}},
                                                                          "bindings": [{"source": f"{prefix}/raw"}]})
            assert bad_mat["status_code"] == 422
            assert bad_mat["messages"][0].startswith(f"materializations.{prefix}/m.endpoint")
            assert "unknown connector 'nosuch'" in bad_mat["messages"][0]
            bad_body = await client._call("POST", "/v1/collections", {"name": "x"})
            assert bad_body["status_code"] == 422 and bad_body["messages"] == ["body.config: required field is missing"]
            taken = await client.create_collection(f"{prefix}/raw", {"schema": RAW_SCHEMA, "key": ["/metadata/id"]})
            assert taken["status_code"] == 409
    exported = localflow("export", str(catalog), env=cli_env(**env))
    assert exported.returncode == 0, exported.stderr
    assert "captures" not in yaml.safe_load(exported.stdout)


async def test_openapi_document_lists_every_route(tmp_path: Path, deployment: Deployment) -> None:
    with api_worker(deployment.catalog, tmp_path / "run.log", **deployment.env) as (_, url):
        async with httpx.AsyncClient() as raw:
            doc = (await raw.get(f"{url}/v1/openapi.json")).json()
    validate(doc)  # a valid OpenAPI 3.1 document
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/health", "/v1/collections", "/v1/captures", "/v1/materializations", "/v1/tasks", "/v1/tasks/{name}",
        "/v1/tasks/{name}/pause", "/v1/tasks/{name}/resume", "/v1/tasks/{name}/restart"}
    assert "name" in doc["paths"]["/v1/captures"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]


async def test_setup_sophia_creates_the_sophia_catalogs_tasks_through_the_api_once(
        tmp_path: Path, fresh_services: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import localflow

    kafka = fresh_services(kafka=True).kafka  # a broker of its own: the sophia/* topics are everyone's names
    empty = write_catalog(tmp_path / "flow.yaml", {"kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
                                                   "collections": {}})
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "SOPHIA_AGENT_LOG_DIR": str(tmp_path)}
    sophia = load_catalog(SOPHIA, env={**env})
    with api_worker(empty, tmp_path / "run.log", **env) as (_, url):
        monkeypatch.setenv("LOCALFLOW_API_URL", url)
        first = await localflow.setup_sophia()
        assert first["success"] and not first["failed"], first["failed"]
        assert first["created"] == [*sophia.collections, *sophia.captures, *sophia.materializations]
        again = await localflow.setup_sophia_estuary_flow()
        assert (again["success"], again["created"], sorted(again["existing"])) == (True, [], sorted(first["created"]))
        async with localflow.EstuaryClient() as client:
            tasks = {t["name"]: t for t in (await client.list_tasks())["tasks"]}
            assert sorted(tasks) == sorted(sophia.task_names())
            assert {t["origin"] for t in tasks.values()} == {"api"}
            assert tasks["sophia/sophia_processed_data"]["kind"] == "derivation"
            assert (await client.list_collections())["count"] == 4


def test_the_short_forms_raw_schema_is_the_sophia_catalogs() -> None:
    example = yaml.safe_load((SOPHIA.parent / "schemas/raw.schema.yaml").read_text())
    example.pop("$schema")
    assert RAW_SCHEMA == example


async def test_a_failing_task_is_failed_with_its_reason_and_health_is_degraded(
        tmp_path: Path, deployment: Deployment) -> None:
    prefix, catalog, env = deployment.prefix, deployment.catalog, deployment.env
    name = f"{prefix}/cache"
    with api_worker(catalog, tmp_path / "run.log", **env) as (_, url):
        async with LocalflowClient(url) as client:
            made = await client.create_materialization(name, {
                "endpoint": {"redis": {"url": f"redis://127.0.0.1:{free_port()}/0",
                                       "advanced": {"connect_timeout": "1s", "retry": {"give_up_after": "1s"}}}},
                "bindings": [{"source": f"{prefix}/raw", "resource": {"key": "k:{/metadata/id}"}}]})
            assert made["success"], made
            failed = await wait_for_async(lambda: _failed(client, name), timeout=60, message="the task to fail")
            assert "127.0.0.1" in failed["reason"] and failed["last_error"]
            health = await client.health_check()
            assert health["status"] == "degraded" and "1 task(s) failed" in health["problems"]


async def _failed(client: LocalflowClient, name: str) -> dict[str, Any] | None:
    task = await client.task_status(name)
    return task if task["state"] == "FAILED" else None
