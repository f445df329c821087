"""The whole Sophia pipeline as users run it, on private servers: its catalog and its processes.

Why: localflow's promises (SPEC "Guarantees") are about the pipeline as users run it, one
process per task, so that is what the reliability tests run:

* the names of the Sophia flow's tasks, collections, tables, keys and bucket;
* ``sophia_catalog``: a catalog derived from `examples/sophia/flow.yaml` (same collections, SQL
  and bindings; short intervals; sources and servers from the environment);
* ``Pipeline``: one `python -m pipeline run CATALOG --task NAME` process per task
  (``TaskProcess``), which a test may kill -9, SIGTERM and restart. Each incarnation logs to
  its own file. ``pipeline_env`` points the processes at the sources and servers.

What the stages hold is counted by `tests.support.census` and judged by `tests.support.judge`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.embedded.services import Services
from tests.support.sources import API_PATH, INSTANCE_HEADER, METRICS_PATH, SourceServer
from tests.support.workers import ROOT, Worker, python_module

EXAMPLE = ROOT / "examples" / "sophia" / "flow.yaml"

API_TASK, LOGS_TASK, METRICS_TASK = "sophia/sophia_ai_data", "sophia/agent_logs", "sophia/metrics"
DERIVATION = "sophia/sophia_processed_data"
POSTGRES, REDIS, S3 = "sophia/postgres", "sophia/redis", "sophia/s3-archive"
TASKS = (API_TASK, LOGS_TASK, METRICS_TASK, DERIVATION, POSTGRES, REDIS, S3)
CAPTURES = (API_TASK, LOGS_TASK, METRICS_TASK)
CONSUMERS = (DERIVATION, POSTGRES, REDIS, S3)

RAW, PROCESSED = "sophia/sophia_raw_data", "sophia/sophia_processed_data"
AGENT_LOGS, METRICS = "sophia/sophia_agent_logs", "sophia/sophia_metrics"
COLLECTIONS = (RAW, PROCESSED, AGENT_LOGS, METRICS)

PG_SCHEMA = "estuary"
PG_TABLES = {PROCESSED: ("sophia_processed_data", "id"), AGENT_LOGS: ("sophia_agent_logs", "metadata/id"),
             METRICS: ("sophia_metrics", "metadata/id")}
"""Postgres bindings of the Sophia catalog: collection -> (table, key column)."""
REDIS_PREFIXES = {PROCESSED: "sophia:processed:", RAW: "sophia:raw:", AGENT_LOGS: "sophia:agent_logs:",
                  METRICS: "sophia:metrics:"}
REDIS_STREAM = "sophia:processed:stream"
S3_BUCKET, S3_PREFIX = "sophia-intel-data", "estuary/"


def topic(collection: str) -> str:
    return collection.replace("/", ".")


def sophia_catalog(path: Path, *, s3_max_age: str = "2s", metrics_interval: str = "2s",
                   edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Write a catalog derived from examples/sophia/flow.yaml: the same collections, enrichment SQL
    and bindings, with short intervals for tests, schemas by absolute path, and no catalog tests.

    Sources and servers come from the environment, as in the example (SOPHIA_API_URL,
    SOPHIA_API_TOKEN, SOPHIA_AGENT_LOG_DIR, SOPHIA_METRICS_URL, POSTGRES_URL, REDIS_URL,
    S3_ENDPOINT_URL, ...). ``edit`` may change the loaded document before it is written.
    """
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc.pop("tests", None)
    for spec in doc["collections"].values():
        spec["schema"] = str((EXAMPLE.parent / spec["schema"]).resolve())
    captures = doc["captures"]
    api = captures[API_TASK]
    api["interval"] = "1s"
    api["endpoint"]["http"]["headers"] = {INSTANCE_HEADER: "${LOCALFLOW_TEST_INSTANCE:-first}"}
    api["endpoint"]["http"].update(timeout="3s", advanced={"retry": {"initial_backoff": "200ms", "max_backoff": "1s",
                                                                     "max_retries": 3}})
    captures[LOGS_TASK]["interval"] = "1s"
    captures[METRICS_TASK]["interval"] = metrics_interval
    captures[METRICS_TASK]["endpoint"]["prometheus"]["timeout"] = metrics_interval
    for binding in doc["materializations"][S3]["bindings"]:
        binding["resource"] = {"max_age": s3_max_age}
    if edit is not None:
        edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Incarnation:
    """One process of a task and, once it ended, how."""

    worker: Worker
    signalled: str = ""
    """'' until the harness signals it: 'killed' or 'terminated' (a task never exits by itself)."""

    @property
    def log(self) -> Path:
        return self.worker.log


class TaskProcess:
    """`python -m pipeline run CATALOG --task NAME [ARGS]`, restartable; each incarnation keeps its log.

    ``tasks`` runs several tasks in the one process (``name`` then only names its logs).
    """

    def __init__(self, name: str, catalog: Path, env: dict[str, str], logs: Path, args: list[str] | None = None,
                 tasks: Iterable[str] | None = None) -> None:
        self.name = name
        self.catalog = catalog
        self.env = env
        self.logs = logs
        self.args = [a for t in (tasks or [name]) for a in ("--task", t)] + list(args or [])
        self.runs: list[Incarnation] = []

    @property
    def current(self) -> Incarnation | None:
        return self.runs[-1] if self.runs else None

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.worker.alive

    def start(self) -> None:
        if self.running:
            return
        log = self.logs / f"{self.name.replace('/', '_')}.{len(self.runs) + 1}.log"
        argv = python_module("pipeline", "run", str(self.catalog), *self.args)
        self.runs.append(Incarnation(Worker(argv, log, env=self.env)))

    def kill(self) -> None:
        """SIGKILL: the process ends at once, mid-whatever, as in a crash or an OOM kill."""
        run = self.current
        if run is not None and run.worker.alive:
            run.signalled = "killed"
            run.worker.kill()

    def signal_stop(self) -> None:
        """Send SIGTERM once (a second one means "exit now, without flushing")."""
        run = self.current
        if run is not None and run.worker.alive and not run.signalled:
            run.signalled = "terminated"
            run.worker.send(signal.SIGTERM)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the exit code (0 = flushed and committed); SIGKILL after ``timeout``."""
        run = self.current
        assert run is not None
        self.signal_stop()
        try:
            return run.worker.wait(timeout)
        except AssertionError:
            run.worker.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout:g}s of SIGTERM; log: {run.log}") from None

    def close(self) -> None:
        """End whatever incarnation still runs (SIGTERM, then SIGKILL after its grace): a teardown."""
        for run in self.runs:
            run.worker.close()

    def output(self, all_runs: bool = True) -> str:
        runs = self.runs if all_runs else self.runs[-1:]
        return "".join(r.worker.output() for r in runs)

    def exited_unexpectedly(self) -> list[str]:
        """Incarnations that ended without being asked to (a task process must never exit by itself)."""
        return [f"{r.log.name}: exit {r.worker.returncode}" for r in self.runs
                if not r.signalled and not r.worker.alive]


class Pipeline:
    """Every task of a catalog as its own worker process, with the environment that points it at
    the sources and servers."""

    def __init__(self, catalog: Path, env: dict[str, str], logs: Path, tasks: Iterable[str] = TASKS,
                 args: list[str] | None = None) -> None:
        self.catalog = catalog
        self.env = env
        logs.mkdir(parents=True, exist_ok=True)
        self.tasks = {name: TaskProcess(name, catalog, env, logs, args) for name in tasks}

    def start(self) -> None:
        for task in self.tasks.values():
            task.start()

    def ensure_running(self) -> None:
        for task in self.tasks.values():
            if not task.running:
                task.start()

    def stop(self) -> dict[str, int]:
        """SIGTERM every task (all at once) and collect the exit codes."""
        running = [t for t in self.tasks.values() if t.running]
        for task in running:
            task.signal_stop()
        codes: dict[str, int] = {}
        try:
            for task in running:
                codes[task.name] = task.terminate()
        finally:  # one that did not stop must not leave the others running
            for task in running:
                task.close()
        return codes

    def unexpected_exits(self) -> list[str]:
        return [f"{name}: {e}" for name, t in self.tasks.items() for e in t.exited_unexpectedly()]


def pipeline_env(services: Services, sources: SourceServer, log_dir: Path, *, s3_endpoint: str | None = None,
                 kafka: str | None = None, **extra: str) -> dict[str, str]:
    """The workers' environment: this interpreter's, minus any server settings, plus ours."""
    drop = {"KAFKA_BOOTSTRAP_SERVERS", "POSTGRES_URL", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_USER",
            "POSTGRES_PASSWORD", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD", "S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SOPHIA_API_URL", "SOPHIA_API_TOKEN",
            "SOPHIA_AGENT_LOG_DIR", "SOPHIA_METRICS_URL", "LOCALFLOW_METRICS_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(services.env())
    if kafka is not None:
        env["KAFKA_BOOTSTRAP_SERVERS"] = kafka
    if s3_endpoint is not None:
        env["S3_ENDPOINT_URL"] = s3_endpoint
    env.update({
        "PYTHONUNBUFFERED": "1",
        "SOPHIA_API_URL": sources.url + API_PATH,
        "SOPHIA_API_TOKEN": sources.api.token,
        "SOPHIA_AGENT_LOG_DIR": str(log_dir),
        "SOPHIA_METRICS_URL": sources.url + METRICS_PATH,
        "S3_CREATE_BUCKET": "true",
        **extra,
    })
    return env
