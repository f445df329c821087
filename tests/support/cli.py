"""Running `localflow` as a user does, in a subprocess, for the tests of its commands (test_cli_*).

    result = localflow("status", str(path))                 # CompletedProcess, text
    with worker(path, "--metrics-port", "0") as w: ...      # `localflow run`, stopped by SIGTERM after
    with command("preview", ..., log=err, stdout=out) as w: # any command in the background

The processes are `tests.support.workers.Worker`s (the one launcher).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.support.workers import ROOT, Worker, python_module

DOC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["id", "n"],
}
"""A small document shape keyed by ``/id``."""


def cli_env(**extra: str) -> dict[str, str]:
    """The current environment (with the session services), wide enough for tables, plus ``extra``."""
    return {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **extra}


def localflow(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `python -m pipeline ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def command(*args: str, log: Path, stdout: Path | int | None = None, env: dict[str, str] | None = None) -> Worker:
    """Start `python -m pipeline ARGS` in the background, stderr to a fresh ``log`` (the caller waits
    for it or signals it; leaving a ``with`` block ends it)."""
    return Worker(python_module("pipeline", *args), log, env=env or cli_env(), stdout=stdout, append=False)


def write_catalog(path: Path, catalog: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    return path


def redis_catalog(tmp_path: Path, name: str) -> Path:
    """A collection ``NAME/docs`` and a Redis materialization ``NAME/cache`` reading it (a task
    with a consumer group), on KAFKA_BOOTSTRAP_SERVERS and REDIS_URL."""
    return write_catalog(tmp_path / "flow.yaml", {
        "kafka": {"bootstrap_servers": "${KAFKA_BOOTSTRAP_SERVERS}"},
        "collections": {f"{name}/docs": {"schema": DOC_SCHEMA, "key": ["/id"]}},
        "materializations": {f"{name}/cache": {
            "endpoint": {"redis": {"url": "${REDIS_URL}"}},
            "bindings": [{"source": f"{name}/docs", "resource": {"key": "k:{/id}"}}]}},
    })


@contextmanager
def worker(catalog: Path, *args: str, log: Path, env: dict[str, str] | None = None) -> Iterator[Worker]:
    """`localflow run CATALOG ARGS` until the block ends (then SIGTERM, and SIGKILL if it hangs);
    its stderr goes to ``log``, which the test can read while it runs."""
    with command("run", str(catalog), *args, log=log, stdout=subprocess.DEVNULL, env=env) as w:
        yield w

