"""Hot reload: `localflow run --watch` applies edits of flow.yaml without a restart.

One worker runs a capture that is never touched (``keep``), and one created through the API,
while the file gains a capture, has it changed, loses it, and is broken; each step is observed
through the API and the source's own count of requests, and at the end ``keep`` has lost nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.control.client import LocalflowClient
from pipeline.runtime.catalog import load_catalog
from pipeline.runtime.collection import read_to_end
from tests.support.api import RAW_SCHEMA, Source, api_worker
from tests.support.cli import cli_env, localflow, write_catalog
from tests.support.waiting import wait_for, wait_for_async


def capture(url: str, target: str, interval: str = "200ms") -> dict[str, Any]:
    return {"interval": interval, "endpoint": {"http": {"url": url}}, "bindings": [{"target": target}]}


def replace(path: Path, catalog: dict[str, Any] | str) -> None:
    """Write the catalog as an editor that saves atomically does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(catalog if isinstance(catalog, str) else yaml.safe_dump(catalog, sort_keys=False))
    os.replace(tmp, path)


async def test_watch_adds_changes_removes_and_refuses_a_broken_file_without_touching_the_rest(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    p = unique_name()
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LOCALFLOW_CONFIG_TOPIC": f"{p}.config"}
    keep, added, through_api = f"{p}/keep", f"{p}/added", f"{p}/api"
    async with Source(p) as source:
        base = {"kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
                "collections": {f"{p}/{c}": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]} for c in ("keep", "more")},
                "captures": {keep: capture(f"{source.url}/keep", f"{p}/keep")}}
        path = write_catalog(tmp_path / "flow.yaml", base)
        with api_worker(path, tmp_path / "run.log", "--watch", **env) as (w, url):
            async with LocalflowClient(url) as client:
                async def state(name: str) -> str | None:
                    return (await client.task_status(name)).get("state")

                async def hits_grow(path: str, by: int) -> None:
                    start = source.hits[path]
                    await wait_for_async(lambda: source.hits[path] >= start + by, timeout=30,
                                         message=f"{by} more requests of /{path}")

                await hits_grow("keep", 1)
                made = await client.create_capture(through_api, {"endpoint": f"{source.url}/api", "interval": "200ms",
                                                                 "target": f"{p}/more"})
                assert made["success"], made

                # add a capture
                replace(path, {**base, "captures": {**base["captures"], added: capture(f"{source.url}/added",
                                                                                      f"{p}/more")}})
                assert await wait_for_async(lambda: _eq(state(added), "RUNNING"), timeout=30,
                                            message="the added capture to run")
                await hits_grow("added", 1)
                assert (await client.task_status(added))["origin"] == "file"

                # change it: it restarts, with its new settings
                replace(path, {**base, "captures": {**base["captures"], added: capture(
                    f"{source.url}/changed", f"{p}/more")}})
                await hits_grow("changed", 1)
                wait_for(lambda: f"stopping {added} (changed)" in w.output(), timeout=10,
                         message="the changed capture's restart in the log")

                # remove it: it stops after its flush, and polls no more
                replace(path, base)
                assert await wait_for_async(lambda: _eq(_status_code(client, added), 404), timeout=30,
                                            message="the removed capture to leave the API")
                polls = source.hits["changed"]
                await hits_grow("keep", 3)
                assert source.hits["changed"] == polls

                # break the file: refused with validate's messages; the running set stays
                broken = {**base, "captures": {**base["captures"], f"{p}/bad": {**capture(
                    f"{source.url}/bad", f"{p}/nowhere"), "interval": "30x"}}}
                replace(path, broken)
                health = await wait_for_async(lambda: _degraded(client), timeout=30,
                                              message="health to report the broken file")
                expected = _validate(path, env)  # the lines of `validate` on the file as it is now
                assert health["problems"] == expected
                for line in expected:
                    assert line in w.output()
                replace(path, "collections: [unclosed\n")
                health = await wait_for_async(lambda: _problems_change(client, expected), timeout=30,
                                              message="health to report the YAML error")
                assert any("not valid YAML" in ln for ln in health["problems"]), health
                assert await state(keep) == "RUNNING"
                await hits_grow("keep", 3)
                assert source.hits["bad"] == 0

                replace(path, base)
                assert await wait_for_async(lambda: _healthy(client), timeout=30, message="health again")
                for name in (keep, through_api):
                    task = await client.task_status(name)
                    assert (task["state"], task["restarts"]) == ("RUNNING", 0), task
                await hits_grow("api", 3)
        assert f"stopping {keep}" not in w.output() and f"stopping {through_api}" not in w.output()
        polled = source.hits["keep"]
    records = await read_to_end(load_catalog(path, env=env).kafka, f"{p}.keep")
    ids = {r.doc["data"]["id"] for r in records}
    assert ids == {f"{p}-keep-{n}" for n in range(1, polled + 1)}, "the capture that kept running lost documents"


async def _eq(value: Any, expected: Any) -> bool:
    return await value == expected


async def _status_code(client: LocalflowClient, name: str) -> int | None:
    return (await client.task_status(name)).get("status_code")


async def _degraded(client: LocalflowClient) -> dict[str, Any] | None:
    health = await client.health_check()
    return health if health["status"] == "degraded" else None


async def _problems_change(client: LocalflowClient, before: list[str]) -> dict[str, Any] | None:
    health = await client.health_check()
    return health if health["problems"] and health["problems"] != before else None


async def _healthy(client: LocalflowClient) -> bool:
    return (await client.health_check())["status"] == "healthy"


def _validate(path: Path, env: dict[str, str]) -> list[str]:
    result = localflow("validate", str(path), env=cli_env(**env))
    assert result.returncode == 2, result.stdout
    return [ln.strip() for ln in result.stderr.splitlines()[1:] if ln.strip()]
