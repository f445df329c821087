"""`localflow status` and `localflow preview` as a new user meets them: with nothing running, and
with a worker that `status` finds by itself (the worker registry in Kafka)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import orjson

from pipeline.embedded.services import free_port
from tests.support.cli import cli_env, localflow, redis_catalog, worker
from tests.support.waiting import wait_for

HINT = "no broker? try localflow demo --keep-services"


def test_preview_with_no_broker_prints_one_line_and_the_hint(tmp_path: Path, unique_name: Callable[..., str]) -> None:
    name, kafka = unique_name(), f"127.0.0.1:{free_port()}"
    result = localflow("preview", str(redis_catalog(tmp_path, name)), f"{name}/docs", "--from-beginning",
                       env=cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka, REDIS_URL="redis://127.0.0.1:1/0"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: no Kafka broker answers at {kafka}", HINT]
    assert result.stdout == ""


def test_status_with_no_broker_says_so_once_and_shows_every_task(tmp_path: Path,
                                                                  unique_name: Callable[..., str]) -> None:
    name, kafka = unique_name(), f"127.0.0.1:{free_port()}"
    result = localflow("status", str(redis_catalog(tmp_path, name)),
                       env=cli_env(KAFKA_BOOTSTRAP_SERVERS=kafka, REDIS_URL="redis://127.0.0.1:1/0"))
    assert result.returncode == 1
    assert result.stderr == "", "no log line of a client library, no unclosed client"
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"! cannot read the worker registry: no Kafka broker answers at {kafka}", HINT]
    assert f"{name}/cache (materialization) · running: unknown · - docs/s · checkpoint age unknown" in lines
    assert "  lag unknown" in lines


def test_status_finds_the_workers_of_the_catalog_without_being_told(
        tmp_path: Path, services_env: dict[str, str], unique_name: Callable[..., str]) -> None:
    name = unique_name()
    catalog = redis_catalog(tmp_path, name)
    env = cli_env(LOCALFLOW_WORKERS="")
    with worker(catalog, "--metrics-port", "0", log=tmp_path / "run.log") as w:
        url = w.url()

        def running() -> dict | None:
            result = localflow("status", str(catalog), "--output", "json", env=env)
            report = orjson.loads(result.stdout)
            task = report["tasks"][0]
            return report if result.returncode == 0 and task["running"] else None

        report = wait_for(running, timeout=60, message="status to find the worker in the registry")
        assert report["discovered"] and report["workers"] == [url]
        task = report["tasks"][0]
        assert (task["name"], task["kind"], task["workers"], task["lag"]) == (f"{name}/cache", "materialization", 1, 0)
        text = localflow("status", str(catalog), env=env)
        assert text.returncode == 0, text.stdout + text.stderr
        assert "1 worker(s) in localflow.workers" in text.stdout.splitlines()
        assert f"{name}/cache (materialization) · running on 1 worker ·" in text.stdout
        assert w.stop(signal.SIGTERM) == 0, w.output()
    after = localflow("status", str(catalog), "--output", "json", env=env)
    report = orjson.loads(after.stdout)
    assert url not in report["workers"], "a stopped worker leaves the registry"
    assert report["tasks"][0]["running"] is None
