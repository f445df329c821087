"""Who may use the API: a bearer token (LOCALFLOW_API_TOKEN) when set, required beyond loopback,
and never shown: not in the worker's log, not in /status, not in any answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipeline.control.client import LocalflowAPIError, LocalflowClient
from tests.support.api import RAW_SCHEMA, api_worker
from tests.support.cli import cli_env, localflow, write_catalog

TOKEN = "lf-test-token-7f3a9c2e41"


def catalog_with_a_capture(tmp_path: Path, prefix: str) -> Path:
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{prefix}/raw": {"schema": RAW_SCHEMA, "key": ["/metadata/id"]}},
    })


async def test_without_the_token_or_with_a_wrong_one_every_route_answers_401(
        tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[..., str]) -> None:
    prefix = unique_name()
    catalog = catalog_with_a_capture(tmp_path, prefix)
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LOCALFLOW_CONFIG_TOPIC": f"{prefix}.config",
           "LOCALFLOW_API_TOKEN": TOKEN}
    with api_worker(catalog, tmp_path / "run.log", "--metrics-port", "0", "--log-level", "debug", **env) as (w, url):
        for token in ("", "wrong-token-1234", TOKEN + "x", TOKEN[:-1]):
            async with LocalflowClient(url, token=token) as client:
                with pytest.raises(LocalflowAPIError) as refused:
                    await client.health_check()
            assert refused.value.status_code == 401
            assert ("wrong token" if token else "LOCALFLOW_API_TOKEN is not set") in str(refused.value)
        async with httpx.AsyncClient(base_url=url) as raw:
            for method, path in (("GET", "/v1/openapi.json"), ("GET", "/v1/tasks"), ("POST", "/v1/captures"),
                                 ("PUT", "/v1/tasks/x/pause"), ("DELETE", "/v1/tasks/x")):
                answer = await raw.request(method, path, headers={"Authorization": "Basic " + TOKEN})
                assert answer.status_code == 401, (method, path)
                assert answer.headers["WWW-Authenticate"].startswith("Bearer")

        async with LocalflowClient(url, token=TOKEN) as client:
            health = await client.health_check()
            assert health["status"] == "healthy"
            made = await client.create_capture(f"{prefix}/cap", {
                "endpoint": "http://127.0.0.1:9/none", "interval": "1h", "target": f"{prefix}/raw",
                "token": "${LOCALFLOW_API_TOKEN}"})
            assert made["success"], made
            answers = [health, made, await client.list_tasks(), await client.list_collections(),
                       await client.task_status(f"{prefix}/cap")]
        assert repr(LocalflowClient(url, token=TOKEN)) == f"LocalflowClient({url!r})"
        metrics_url = w.url()
        async with httpx.AsyncClient() as raw:
            status = (await raw.get(f"{metrics_url}/status")).text
        assert f"{prefix}/cap" in status
    assert "every request must carry LOCALFLOW_API_TOKEN" in w.output()
    for shown in (w.output(), status, *map(str, answers)):
        assert TOKEN not in shown


def test_a_bind_beyond_loopback_without_a_token_is_refused_at_startup(tmp_path: Path, kafka_bootstrap: str,
                                                                       unique_name: Callable[..., str]) -> None:
    catalog = catalog_with_a_capture(tmp_path, unique_name())
    result = localflow("run", str(catalog), "--api-port", "0", "--api-host", "0.0.0.0",
                       env=cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap, LOCALFLOW_API_TOKEN=""), timeout=60)
    assert result.returncode == 2
    assert "--api-host 0.0.0.0 is beyond loopback: set LOCALFLOW_API_TOKEN" in result.stderr


def test_loopback_is_the_only_address_open_without_a_token() -> None:
    from pipeline.control.api import is_loopback

    assert [h for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost") if not is_loopback(h)] == []
    assert [h for h in ("0.0.0.0", "::", "10.0.0.5", "example.com", "") if is_loopback(h)] == []


def test_doctor_checks_that_the_api_answers_and_accepts_the_token(tmp_path: Path, kafka_bootstrap: str,
                                                                   unique_name: Callable[..., str]) -> None:
    prefix = unique_name()
    catalog = catalog_with_a_capture(tmp_path, prefix)
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "LOCALFLOW_CONFIG_TOPIC": f"{prefix}.config"}
    with api_worker(catalog, tmp_path / "run.log", **env, LOCALFLOW_API_TOKEN=TOKEN) as (_, url):
        with ThreadPoolExecutor(2) as pool:  # both at once: each waits on the Estuary checks
            good, wrong = pool.map(lambda token: localflow("doctor", str(catalog), "--timeout", "5", env=cli_env(
                **env, LOCALFLOW_API_URL=url, LOCALFLOW_API_TOKEN=token)), (TOKEN, "not-the-token-42"))
    assert good.returncode == 0, good.stdout
    assert re.search(rf"^OK\s+localflow api {re.escape(url)}\s+healthy, 0 task\(s\); token accepted$", good.stdout,
                     re.M), good.stdout
    assert wrong.returncode == 1, wrong.stdout
    assert re.search(r"^FAIL\s+localflow api \S+\s+LOCALFLOW_API_TOKEN was refused$", wrong.stdout, re.M), wrong.stdout
    for out in (good.stdout, wrong.stdout):
        assert TOKEN not in out and "not-the-token-42" not in out
